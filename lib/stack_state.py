"""The embedded stack's state folder: its port layout, the generated credentials (S3 keys, database
passwords, the cluster administrator, SeaweedFS's signing keys) and SeaweedFS's TLS material and
security configuration. Nothing here starts or stops a server (lib/stack.py does); lib/config.py
reads the state to point a run at the stack, so this module imports nothing of lib above
lib.errors.

Layout of the state folder (git-ignored, mode 0700; as root 0710 for group pgserver, see below):

    stack.json           ports, role names (pipeline, administrator), database name (0600)
    credentials.json     generated S3 keys, database passwords, SeaweedFS signing keys (0600)
    seaweedfs/           weed data, weed.log, weed.pid, logs/ (0700, weed runs with umask 077; every file 0600)
    seaweedfs/config/    security.toml (JWT keys, mutual TLS) and tls/ (CA and weed certificate)
    postgres/data        the PostgreSQL cluster (password auth, TCP 127.0.0.1 only, no Unix socket)

Ports come from one base (PIPELINE_STACK_PORT_BASE, default 18330): S3 base, master +1, volume +2,
filer +3, admin +4, PostgreSQL +5; SeaweedFS adds 10000 for each gRPC port. weed's Unix sockets are
`weed_sockets`. docs/stack.md's tables of ports and sockets are checked against these.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import pwd
import secrets
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lib.errors import PipelineError

DEFAULT_PORT_BASE = 18330
PORT_OFFSETS = {"s3": 0, "master": 1, "volume": 2, "filer": 3, "admin": 4, "postgres": 5}
GRPC_OFFSET = 10000
DB_ADMIN = "medallion_admin"  # the cluster's superuser; the pipeline's role is db_user


class StackError(PipelineError):
    """The embedded stack could not be started or stopped; the message says why and where to look."""


@dataclass(frozen=True)
class EmbeddedState:
    port_base: int
    access_key: str
    secret_key: str
    db_user: str
    db_password: str
    db_name: str

    @property
    def s3_port(self) -> int:
        return self.port_base + PORT_OFFSETS["s3"]

    @property
    def pg_port(self) -> int:
        return self.port_base + PORT_OFFSETS["postgres"]

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"


def weed_dir(sdir: Path) -> Path:
    return sdir / "seaweedfs"


def weed_logs(sdir: Path) -> Path:
    """weed's own log files (glog: weed.<host>.<user>.log.<SEVERITY>.<time>.<pid>, 5 kept per severity)."""
    return weed_dir(sdir) / "logs"


# weed's Unix sockets: the S3 API's and the filer's in the state folder (placed by weed's flags), and
# one per gRPC port in /tmp, where weed puts them itself (no flag moves them; each is 0700, umask 077).
LOCAL_SOCKETS = {"s3": "s3.sock", "filer": "filer.sock"}
GRPC_SOCKET = "/tmp/seaweedfs-{name}-grpc-{port}.sock"


def weed_sockets(sdir: Path, port_base: int) -> dict[str, Path]:
    """Every Unix socket weed listens on, by what listens: "s3", "filer", "<name> gRPC"."""
    found = {name: weed_dir(sdir) / file for name, file in LOCAL_SOCKETS.items()}
    for name, off in PORT_OFFSETS.items():
        if name != "postgres":
            found[f"{name} gRPC"] = Path(GRPC_SOCKET.format(name=name, port=port_base + off + GRPC_OFFSET))
    return found


def pg_data(sdir: Path) -> Path:
    return sdir / "postgres" / "data"


def read_state(sdir: Path) -> EmbeddedState | None:
    try:
        ports = json.loads((sdir / "stack.json").read_text())
        creds = json.loads((sdir / "credentials.json").read_text())
    except FileNotFoundError:
        return None
    return EmbeddedState(
        port_base=int(ports["port_base"]),
        db_user=ports["db_user"],
        db_name=ports["db_name"],
        access_key=creds["access_key"],
        secret_key=creds["secret_key"],
        db_password=creds["db_password"],
    )


def write_private(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)


def write_text_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def make_private(folder: Path) -> None:
    """Take group and other permissions off everything under `folder` (links are not followed).
    weed runs with umask 077, but sets the volume info files (.vif) it writes to 0644 itself."""
    for path in [folder, *folder.rglob("*")]:
        try:
            mode = path.lstat().st_mode
            if mode & 0o077 and not stat.S_ISLNK(mode):
                path.chmod(stat.S_IMODE(mode) & 0o700)
        except FileNotFoundError:  # removed meanwhile
            continue


def init_state(sdir: Path, port_base: int | None = None) -> EmbeddedState:
    """Create the state folder with new credentials, or return the existing state unchanged."""
    sdir.mkdir(parents=True, exist_ok=True)
    _secure_state_dir(sdir)
    state = read_state(sdir)
    if state is not None:
        return state
    if port_base is None:
        port_base = int(os.environ.get("PIPELINE_STACK_PORT_BASE") or DEFAULT_PORT_BASE)
    creds_path = sdir / "credentials.json"
    if not creds_path.exists():
        write_private(
            creds_path,
            {
                "access_key": "medallion-" + secrets.token_hex(6),
                "secret_key": secrets.token_urlsafe(30),
                "db_password": secrets.token_urlsafe(24),
            },
        )
    write_private(sdir / "stack.json", {"port_base": port_base, "db_user": "medallion", "db_name": "countries",
                                         "db_admin": DB_ADMIN})
    return read_state(sdir)


def port_base(sdir: Path) -> int:
    state = read_state(sdir)
    if state is not None:
        return state.port_base
    return int(os.environ.get("PIPELINE_STACK_PORT_BASE") or DEFAULT_PORT_BASE)


# --- the cluster administrator -------------------------------------------------------------------

def admin_credentials(sdir: Path) -> tuple[str, str]:
    """The cluster administrator (role, password): used by `stack` commands only, never by a run.
    A state folder from before the administrator existed gets its password now (stored 0600)."""
    ports = json.loads((sdir / "stack.json").read_text())
    creds = json.loads((sdir / "credentials.json").read_text())
    if not creds.get("db_admin_password"):
        creds["db_admin_password"] = secrets.token_urlsafe(24)
        write_private(sdir / "credentials.json", creds)
    return ports.get("db_admin") or DB_ADMIN, creds["db_admin_password"]


def record_admin(sdir: Path, admin: str) -> None:
    ports = json.loads((sdir / "stack.json").read_text())
    if ports.get("db_admin") != admin:
        ports["db_admin"] = admin
        write_private(sdir / "stack.json", ports)


# --- the state folder's owner: as root, the PostgreSQL system user -------------------------------

PG_SYSTEM_USER = "pgserver"


def pg_user() -> str | None:
    """PostgreSQL refuses to run as root: as root, run it as the `pgserver` system user (the same
    user the pgserver package itself creates)."""
    if os.geteuid() != 0:
        return None

    try:
        pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", PG_SYSTEM_USER],
                       check=True, capture_output=True)
    return PG_SYSTEM_USER


def _secure_state_dir(sdir: Path) -> None:
    """The state folder is its owner's alone (0700). As root, PostgreSQL runs as the `pgserver` system
    user, which must pass through the state folder to its data folder: the folder then belongs to
    group pgserver with search permission only (0710), so no other account can enter it."""
    user = pg_user()
    if user is None:
        sdir.chmod(0o700)
        return

    os.chown(sdir, -1, pwd.getpwnam(user).pw_gid)
    sdir.chmod(0o710)


# --- SeaweedFS security: JWT-signed HTTP, mutual TLS on gRPC ----------------------------------------

WEED_KEYS = ("weed_jwt_write", "weed_jwt_read", "weed_filer_jwt_write", "weed_filer_jwt_read",
             "weed_admin_password")


def weed_config_dir(sdir: Path) -> Path:
    return weed_dir(sdir) / "config"


def _ensure_weed_keys(sdir: Path) -> dict:
    """The SeaweedFS signing keys, generated once and kept in credentials.json with the others."""
    path = sdir / "credentials.json"
    creds = json.loads(path.read_text())
    missing = [k for k in WEED_KEYS if not creds.get(k)]
    if missing:
        creds.update({k: secrets.token_urlsafe(32) for k in missing})
        write_private(path, creds)
    return creds


def _ensure_weed_tls(tls: Path) -> None:
    """A private CA and one certificate for every SeaweedFS component (client and server): gRPC
    between them is mutual TLS, so a connection without a certificate of this CA gets nothing."""
    if all((tls / n).exists() for n in ("ca.crt", "weed.crt", "weed.key")):
        return

    from cryptography import x509  # late: only a first start makes certificates, and config imports this module
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    tls.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    life = datetime.timedelta(days=3650)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "countries-medallion stack CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + life)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weed")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + life)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # the CA key is dropped: nothing else gets signed
    pem = serialization.Encoding.PEM
    for name, data in (("ca.crt", ca.public_bytes(pem)), ("weed.crt", leaf.public_bytes(pem)),
                       ("weed.key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))):
        fd = os.open(tls / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)


def write_weed_security(sdir: Path) -> Path:
    """seaweedfs/config/security.toml (0600), rewritten from credentials.json at every start:
    JWT-signed reads and writes on the volume and filer HTTP ports, no volume UI, no directory
    listings, mutual TLS for every gRPC port, a password on the admin server."""
    creds = _ensure_weed_keys(sdir)
    cdir = weed_config_dir(sdir)
    cdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tls = cdir / "tls"
    _ensure_weed_tls(tls)
    q = json.dumps  # TOML basic strings share JSON's escaping for these values
    lines = [
        "# Written by lib/stack_state.py from credentials.json at every start: edits are lost.",
        "[jwt.signing]", f"key = {q(creds['weed_jwt_write'])}", "expires_after_seconds = 10",
        "[jwt.signing.read]", f"key = {q(creds['weed_jwt_read'])}", "expires_after_seconds = 10",
        "[jwt.filer_signing]", f"key = {q(creds['weed_filer_jwt_write'])}", "expires_after_seconds = 10",
        "[jwt.filer_signing.read]", f"key = {q(creds['weed_filer_jwt_read'])}", "expires_after_seconds = 10",
        "[access]", "ui = false",
        "[filer.expose_directory_metadata]", "enabled = false",
        "[admin]", 'user = "admin"', f"password = {q(creds['weed_admin_password'])}",
        "[grpc]", f"ca = {q(str(tls / 'ca.crt'))}",
    ]
    for part in ("master", "volume", "filer", "s3", "admin", "worker", "msg_broker", "msg_agent", "mq", "client"):
        lines += [f"[grpc.{part}]", f"cert = {q(str(tls / 'weed.crt'))}", f"key = {q(str(tls / 'weed.key'))}"]
    for part in ("master", "volume", "filer", "admin"):  # HTTP too: a client certificate of our CA, or no answer
        lines += [f"[https.{part}]", f"cert = {q(str(tls / 'weed.crt'))}", f"key = {q(str(tls / 'weed.key'))}",
                  f"ca = {q(str(tls / 'ca.crt'))}"]
    lines += ["[https.client]", "enabled = true", f"cert = {q(str(tls / 'weed.crt'))}",
              f"key = {q(str(tls / 'weed.key'))}", f"ca = {q(str(tls / 'ca.crt'))}"]
    path = cdir / "security.toml"
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(path.with_suffix(".tmp"), path)
    return cdir
