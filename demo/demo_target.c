/* A small multi-threaded program for the corepeek demo: one thread per
 * blocking style, each parked in a function whose name shows in a backtrace. */
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int pipefd[2];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
char demo_message[64] = "hello from the demo target";

static void *demo_sleeper(void *arg) {
    (void)arg;
    for (;;) { struct timespec ts = {3600, 0}; nanosleep(&ts, NULL); }
    return NULL;
}

static void *demo_pipe_reader(void *arg) {
    char c;
    (void)arg;
    while (read(pipefd[0], &c, 1) > 0) {}
    return NULL;
}

static void *demo_cond_waiter(void *arg) {
    (void)arg;
    pthread_mutex_lock(&lock);
    for (;;) pthread_cond_wait(&cond, &lock);
    return NULL;
}

int main(void) {
    pthread_t t[3];
    if (pipe(pipefd) != 0) return 1;
    pthread_create(&t[0], NULL, demo_sleeper, NULL);
    pthread_create(&t[1], NULL, demo_pipe_reader, NULL);
    pthread_create(&t[2], NULL, demo_cond_waiter, NULL);
    printf("demo target running as pid %d\n", (int)getpid());
    fflush(stdout);
    for (;;) pause();
}
