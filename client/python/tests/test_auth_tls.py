"""A server with a bearer token (HARDNEG_AUTH_TOKEN), and one serving TLS."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

import hardneg

from conftest import Server


def test_bearer_token(tmp_path: Path) -> None:
    server = Server(tmp_path / "data", env={"HARDNEG_AUTH_TOKEN": "secret"})
    try:
        with server.miner() as anonymous:
            assert anonymous.health() == "SERVING", "health needs no token"
            with pytest.raises(hardneg.Unauthenticated) as e:
                anonymous.list()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(hardneg.Unauthenticated):
                list(anonymous.mine_stream([hardneg.batch("c", ["x"], num_negatives=1)]))
        with server.miner("guess") as wrong:
            with pytest.raises(hardneg.Unauthenticated):
                wrong.create("c")
            with pytest.raises(hardneg.Unauthenticated):
                wrong.ingest("c", [("d0", "a wing")])
        with server.miner("secret") as right:
            right.create("c")
            right.ingest("c", [("d0", "the wing stalls at high angles of attack"), ("d1", "flutter of aircraft wings"), ("d2", "heat transfer in hypersonic flow")])
            response = right.mine("c", [{"text": "wing flutter", "positive_ids": ["d1"]}], num_negatives=2)
            assert {n.id for n in response.results[0].negatives} == {"d0", "d2"}
            streamed = list(right.mine_stream([hardneg.batch("c", ["wing"], num_negatives=1)]))
            assert len(streamed) == 1
        assert "secret" not in server.log_text(), "the token is never logged"
    finally:
        assert server.stop() == 0, server.log_text()


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate it signs, for 127.0.0.1 and localhost."""
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = directory / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run = lambda *args: subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=hardneg test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=localhost")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", ext)
    return ca, cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make test certificates")
def test_tls_with_root_certificates(tmp_path: Path) -> None:
    ca, cert, key = make_certificates(tmp_path)
    env = {"HARDNEG__SERVER__TLS_CERT_FILE": str(cert), "HARDNEG__SERVER__TLS_KEY_FILE": str(key), "HARDNEG_AUTH_TOKEN": "secret"}
    server = Server(tmp_path / "data", env=env, tls_roots=ca)
    try:
        # The CA as a path and as bytes; the token travels over TLS.
        with hardneg.Miner(server.addr, "secret", root_certificates=ca) as m:
            assert m.tls
            m.create("c")
            m.ingest("c", [("d0", "shock waves in supersonic nozzles"), ("d1", "laminar flow over a cone")])
            assert m.get("c").doc_count == 2
        with hardneg.Miner(f"https://localhost:{server.port}", "secret", root_certificates=ca.read_bytes()) as m:
            response = m.mine("c", ["supersonic shock"], num_negatives=1)
            assert response.results[0].negatives[0].id == "d0"
        # Plaintext to a TLS server, or TLS with roots that did not sign it, gets no answer.
        with hardneg.Miner(server.addr, "secret", timeout=5.0) as plain:
            with pytest.raises(hardneg.Unavailable):
                plain.list()
        with hardneg.Miner(server.addr, "secret", root_certificates=ca_other(tmp_path), timeout=5.0) as untrusted:
            with pytest.raises(hardneg.Unavailable):
                untrusted.list()
    finally:
        assert server.stop() == 0, server.log_text()


def ca_other(directory: Path) -> bytes:
    """A CA certificate that signed nothing the server holds."""
    other = directory / "other"
    other.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", other / "k", "-out", other / "ca.pem",
                    "-days", "2", "-subj", "/CN=another CA"], check=True, capture_output=True)
    return (other / "ca.pem").read_bytes()
