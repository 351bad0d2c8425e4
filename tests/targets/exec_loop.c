/*
 * exec_loop.c - re-executes itself every few milliseconds, forever.
 *
 * Usage: exec_loop GENERATION   (start with 0)
 * Two threads sleep while the main thread waits ~5 ms and then execv()s the
 * same binary with GENERATION+1, so the pid and start time stay the same
 * while the image, the threads and the mappings change under a capture.
 * The generation is visible in /proc/PID/cmdline. No control protocol.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static void *sleeper(void *arg)
{
    (void)arg;
    for (;;) {
        struct timespec ts = {1, 0};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    long gen = argc > 1 ? atol(argv[1]) : 0;
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&th[i], NULL, sleeper, NULL);
    struct timespec ts = {0, 5 * 1000 * 1000};
    nanosleep(&ts, NULL);
    char next[32];
    snprintf(next, sizeof next, "%ld", gen + 1);
    char *args[] = {argv[0], next, NULL};
    execv("/proc/self/exe", args);
    perror("execv");
    return 1;
}
