"""The socket mutator is handed to gRPC only by grpcio releases whose layout was checked."""

from corepeek_agent import sockbuf


def test_given_a_checked_release_then_the_mutator_is_used() -> None:
    assert sockbuf.grpc_release_tested("1.85.4")
    if sockbuf.grpc_release_tested():
        assert [name for name, _ in sockbuf.buffer_options(1 << 20)] == ["grpc.socket_mutator"]


def test_given_an_unchecked_release_then_no_mutator_reaches_grpc(monkeypatch) -> None:
    assert not sockbuf.grpc_release_tested("1.90.0")
    assert not sockbuf.grpc_release_tested("2.85.0")
    monkeypatch.setattr(sockbuf.grpc, "__version__", "1.99.0")
    assert sockbuf.buffer_options(1 << 20) == []


def test_given_zero_sizes_then_no_option() -> None:
    assert sockbuf.buffer_options(0, 0) == []
