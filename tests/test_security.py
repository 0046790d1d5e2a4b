"""Security: TLS, mutual TLS and bearer-token roles against real servers on 127.0.0.1.

The tests make their own CA, server certificate (SAN IP:127.0.0.1, DNS:localhost) and client certificate with the
openssl command-line tool, and their own random tokens.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from client.client import ClientError, ViTClient
from engine.errors import ConfigError
from proto import vitserve_pb2
from server import __main__ as server_main
from server.auth import (
    READ,
    ROLES,
    SERVICE_PREFIX,
    V2_PREFIX,
    V2_ROLES,
    WRITE,
    Security,
    TokenAuth,
    is_loopback,
    required_role,
)
from server.config import Settings
from tests.helpers import LEARNING_RATE, REPO, batch

ALL_RPCS = [m.name for m in vitserve_pb2.DESCRIPTOR.services_by_name["VitServe"].methods]


# ---------------------------------------------------------------- certificates

def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _key_and_csr(folder: Path, name: str, subject: str) -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=folder)


def _sign(folder: Path, name: str, extensions: str) -> None:
    (folder / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-sha256", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca.pem, server.pem/server.key (127.0.0.1, localhost), client.pem/client.key, all signed by the CA."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command-line tool is not installed")
    folder = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=vitserve test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)
    _key_and_csr(folder, "server", "/CN=localhost")
    _sign(folder, "server", "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
                            "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _key_and_csr(folder, "client", "/CN=vitserve test client")
    _sign(folder, "client", "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n")
    return folder


def tls_settings(pki: Path, mutual: bool = False) -> dict:
    settings = {"tls_cert": str(pki / "server.pem"), "tls_key": str(pki / "server.key")}
    if mutual:
        settings["tls_client_ca"] = str(pki / "ca.pem")
    return settings


def codes(call) -> str:
    with pytest.raises(ClientError) as e:
        call()
    return e.value.code


# ---------------------------------------------------------------- TLS

def test_tls_client_with_the_ca_predicts(serve, pki):
    server = serve(**tls_settings(pki))
    images, _ = batch(2)
    with ViTClient(server.address, timeout=20, tls_ca=pki / "ca.pem") as client:
        assert client.health() == "SERVING"
        assert len(client.predict(images).predictions) == 2


def test_plaintext_client_cannot_talk_to_a_tls_server(serve, pki):
    server = serve(**tls_settings(pki))
    images, _ = batch(1)
    with ViTClient(server.address, timeout=5) as client:
        assert codes(lambda: client.predict(images)) == "UNAVAILABLE"


def test_mutual_tls_needs_a_client_certificate(serve, pki):
    server = serve(**tls_settings(pki, mutual=True))
    images, _ = batch(1)
    with ViTClient(server.address, timeout=5, tls_ca=pki / "ca.pem") as client:
        assert codes(lambda: client.predict(images)) == "UNAVAILABLE"
    with ViTClient(server.address, timeout=20, tls_ca=pki / "ca.pem", tls_cert=pki / "client.pem",
                   tls_key=pki / "client.key") as client:
        assert len(client.predict(images).predictions) == 1


def https_door(server, pki: Path, mutual: bool = False):
    """The HTTP door of `server` on a free port with the same certificate (and client CA) as its gRPC port."""
    from server.auth import Security
    from server.http import create_http_server

    settings = server.plane.settings.model_copy(update={"http_port": 0, **tls_settings(pki, mutual)})
    return create_http_server(settings, server.plane, Security.from_settings(settings))


def test_the_http_door_serves_https_with_the_grpc_certificate(serve, pki):
    import ssl
    import urllib.request

    server = serve(**tls_settings(pki))
    door = https_door(server, pki)
    try:
        trusted = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with urllib.request.urlopen(f"https://127.0.0.1:{door.port}/v2/health/ready", context=trusted,
                                    timeout=10) as answer:
            assert answer.status == 200
        with pytest.raises(urllib.error.URLError) as refused:  # a client that does not trust the CA
            urllib.request.urlopen(f"https://127.0.0.1:{door.port}/v2/health/ready", timeout=10)
        assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
    finally:
        door.stop()


def test_the_https_door_with_a_client_ca_needs_a_client_certificate(serve, pki):
    import ssl
    import urllib.request

    server = serve(**tls_settings(pki, mutual=True))
    door = https_door(server, pki, mutual=True)
    try:
        anonymous = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            urllib.request.urlopen(f"https://127.0.0.1:{door.port}/v2/health/ready", context=anonymous, timeout=10)
        known = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        known.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        with urllib.request.urlopen(f"https://127.0.0.1:{door.port}/v2/health/ready", context=known,
                                    timeout=10) as answer:
            assert answer.status == 200
    finally:
        door.stop()


def test_tls_settings_are_checked(pki):
    with pytest.raises(ConfigError, match="together"):
        Security.from_settings(Settings(tls_cert=str(pki / "server.pem")))
    with pytest.raises(ConfigError, match="needs tls_cert"):
        Security.from_settings(Settings(tls_client_ca=str(pki / "ca.pem")))
    with pytest.raises(ConfigError, match="cannot read"):
        Security.from_settings(Settings(tls_cert=str(pki / "missing.pem"), tls_key=str(pki / "server.key")))


# ---------------------------------------------------------------- tokens

@pytest.fixture
def tokens() -> tuple[str, str]:
    return "read-" + secrets.token_urlsafe(24), "write-" + secrets.token_urlsafe(24)


def test_every_rpc_has_a_role():
    """A new RPC must be classified on purpose; unclassified ones need the write token (fail closed)."""
    assert sorted(ALL_RPCS) == sorted(m[len(SERVICE_PREFIX):] for m in ROLES)
    assert required_role(SERVICE_PREFIX + "SomethingNew") == WRITE
    assert required_role("/grpc.health.v1.Health/Check") is None
    assert required_role("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None


def test_every_v2_method_served_has_a_role():
    """The KServe v2 methods: probes open, inference and metadata read, anything else write (fail closed)."""
    from server.kserve import METHODS
    assert sorted(METHODS) == sorted(m[len(V2_PREFIX):] for m in V2_ROLES)
    assert required_role(V2_PREFIX + "ServerLive") is None and required_role(V2_PREFIX + "ServerReady") is None
    for name in ("ModelInfer", "ModelMetadata", "ModelReady", "ServerMetadata"):
        assert required_role(V2_PREFIX + name) == READ
    assert required_role(V2_PREFIX + "RepositoryModelLoad") == WRITE


def test_token_roles(serve, tokens):
    read, write = tokens
    server = serve(read_token=read, write_token=write)
    images, labels = batch(4)
    with ViTClient(server.address, timeout=20) as anonymous:
        assert anonymous.health() == "SERVING"  # probes need no token
        assert codes(lambda: anonymous.predict(images)) == "UNAUTHENTICATED"
        assert codes(lambda: anonymous.train_step(images, labels)) == "UNAUTHENTICATED"
        assert codes(anonymous.model_info) == "UNAUTHENTICATED"
    with ViTClient(server.address, timeout=20, token="wrong-" + read) as wrong:
        with pytest.raises(ClientError) as e:
            wrong.predict(images)
        assert e.value.code == "UNAUTHENTICATED" and "missing or invalid bearer token" in e.value.details
        assert codes(lambda: wrong.train_step(images, labels)) == "UNAUTHENTICATED"
    with ViTClient(server.address, timeout=20, token=read) as reader:
        assert reader.health() == "SERVING"
        assert len(reader.predict(images).predictions) == 4
        assert reader.model_info().step == 0
        assert reader.eval_step(images, labels).count == 4
        assert reader.list_checkpoints().checkpoints == []
        assert reader.get_optimizer().learning_rate == pytest.approx(LEARNING_RATE)
        with pytest.raises(ClientError) as e:
            reader.train_step(images, labels)
        assert e.value.code == "PERMISSION_DENIED" and "needs the write token" in e.value.details
        for call in (lambda: reader.set_optimizer(learning_rate=0.1), reader.save_checkpoint,
                     lambda: reader.restore_checkpoint("x"), reader.publish):
            assert codes(call) == "PERMISSION_DENIED"
    assert server.plane.model_info().step == 0  # nothing the read token sent was applied
    with ViTClient(server.address, timeout=60, token=write) as writer:
        assert len(writer.predict(images).predictions) == 4  # the write token also reads
        assert writer.train_step(images, labels).step == 1
        assert writer.save_checkpoint("after-one").step == 1
    assert server.plane.model_info().step == 1


def test_only_a_write_token_protects_reads_too(serve, tokens):
    _, write = tokens
    server = serve(write_token=write)
    images, _ = batch(1)
    with ViTClient(server.address, timeout=20) as anonymous:
        assert codes(lambda: anonymous.predict(images)) == "UNAUTHENTICATED"
    with ViTClient(server.address, timeout=20, token=write) as writer:
        assert len(writer.predict(images).predictions) == 1


def test_tokens_from_files_and_from_the_environment(serve, tokens, tmp_path):
    read, write = tokens
    (tmp_path / "read").write_text(read + "\n")
    (tmp_path / "write").write_text(f"  {write}\n")
    from_files = Settings.from_env(environ={"VITSERVE_READ_TOKEN_FILE": str(tmp_path / "read"),
                                            "VITSERVE_WRITE_TOKEN_FILE": str(tmp_path / "write")})
    from_env = Settings.from_env(environ={"VITSERVE_READ_TOKEN": read, "VITSERVE_WRITE_TOKEN": write})
    for settings in (from_files, from_env):
        security = Security.from_settings(settings)
        assert (security.read_token, security.write_token) == (read, write)
        assert read not in repr(settings) and write not in repr(settings) and read not in repr(security)
    server = serve(read_token_file=str(tmp_path / "read"), write_token_file=str(tmp_path / "write"))
    images, labels = batch(2)
    with ViTClient(server.address, timeout=20, token=read) as reader:
        assert len(reader.predict(images).predictions) == 2
        assert codes(lambda: reader.train_step(images, labels)) == "PERMISSION_DENIED"
    with ViTClient(server.address, timeout=60, token=write) as writer:
        assert writer.train_step(images, labels).step == 1


def test_token_settings_are_checked(tmp_path):
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        Security.from_settings(Settings(read_token_file=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="not both"):
        Security.from_settings(Settings(read_token="abc", read_token_file=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="differ"):
        Security.from_settings(Settings(read_token="same-token", write_token="same-token"))
    with pytest.raises(ConfigError, match="cannot read"):
        Security.from_settings(Settings(write_token_file=str(tmp_path / "missing")))


def test_bearer_header_parsing():
    auth = TokenAuth("r-token", "w-token")
    assert auth.role_of([("authorization", "Bearer w-token")]) == "write"
    assert auth.role_of([("authorization", "bearer r-token")]) == "read"
    assert auth.role_of([("authorization", "Basic r-token")]) is None
    assert auth.role_of([("authorization", "Bearer r-token-x")]) is None
    assert auth.role_of([("authorization", "Bearer ")]) is None
    assert auth.role_of([]) is None
    assert TokenAuth("", "w-token").role_of([("authorization", "Bearer ")]) is None  # '' never matches


def test_token_values_are_never_logged(serve, tokens, caplog):
    read, write = tokens
    caplog.set_level(logging.DEBUG)
    server = serve(read_token=read, write_token=write)
    images, labels = batch(2)
    with ViTClient(server.address, timeout=20, token=read) as reader:
        assert len(reader.predict(images).predictions) == 2
        assert codes(lambda: reader.train_step(images, labels)) == "PERMISSION_DENIED"
    with ViTClient(server.address, timeout=20, token=write + "x") as wrong:
        assert codes(lambda: wrong.predict(images)) == "UNAUTHENTICATED"
    with ViTClient(server.address, timeout=60, token=write) as writer:
        assert writer.train_step(images, labels).step == 1
    server.stop()
    text = caplog.text
    assert "bearer-token authentication on" in text
    assert read not in text and write not in text


def test_insecure_mode_is_logged(caplog, serve):
    caplog.set_level(logging.INFO, logger="server")
    serve()
    assert any(r.levelno == logging.INFO and "insecure mode" in r.getMessage() for r in caplog.records)
    assert not any(r.levelno >= logging.WARNING and "TLS" in r.getMessage() for r in caplog.records)


def test_plaintext_on_a_public_address_warns(caplog):
    from server.auth import log_mode

    caplog.set_level(logging.INFO, logger="server")
    log_mode(Security(), "0.0.0.0")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "no TLS" in warnings[0].getMessage()
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("")


def test_server_help_takes_no_token_value(capsys):
    with pytest.raises(SystemExit):
        server_main.parse_args(["--help"])
    options = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip().startswith("--")]
    assert "--read-token-file" in options and "--write-token-file" in options and "--tls-cert" in options
    assert not [o for o in options if "token" in o and not o.endswith("-file")]
    for flag in ("--read-token", "--write-token", "--token"):  # not even as an abbreviation of --*-token-file
        with pytest.raises(SystemExit):
            server_main.parse_args([flag, "secret"])


# ---------------------------------------------------------------- the CLI

def client_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VITSERVE_")}
    environ.update(env)
    return subprocess.run([sys.executable, "-m", "client", *args], cwd=REPO, env=environ, capture_output=True,
                          text=True, timeout=120)


def test_cli_tokens_and_tls(serve, pki, tokens, tmp_path):
    read, write = tokens
    server = serve(read_token=read, write_token=write, **tls_settings(pki))
    common = ["--address", server.address, "--tls-ca", str(pki / "ca.pem")]

    missing = client_cli(*common, "info")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        "error: UNAUTHENTICATED: missing or invalid bearer token (send metadata 'authorization: Bearer <token>')"]

    info = client_cli(*common, "--json", "info", VITSERVE_TOKEN=read)
    assert info.returncode == 0, info.stderr
    assert '"step": 0' in info.stdout
    assert json.loads(info.stdout)["step"] == 0 and json.loads(info.stdout)["name"] == "digits4"

    denied = client_cli(*common, "publish", VITSERVE_TOKEN=read)
    assert denied.returncode == 1 and denied.stderr.startswith("error: PERMISSION_DENIED: ")

    (tmp_path / "token").write_text(write + "\n")
    published = client_cli(*common, "--token-file", str(tmp_path / "token"), "publish")
    assert published.returncode == 0, published.stderr
    assert published.stdout.startswith("published model version 1 (weights of step 0)"), published.stdout

    from client.__main__ import main as client_main
    assert client_main(["--address", server.address, "--token", read, "info"]) == 2  # no token flag, not even abbreviated

    health = client_cli(*common, "health")  # probes need no token
    assert health.returncode == 0 and health.stdout.strip() == "SERVING"
    for output in (missing, info, denied, published):
        assert read not in output.stdout + output.stderr and write not in output.stdout + output.stderr
