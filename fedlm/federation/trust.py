"""Who may do what across organisations: silo keys, the coordinator's registry, the Fleet-only proxy.

    key = make_silo_key(Path("legal.key"))                  # on the silo: legal.key + legal.key.pub
    add_silo(Path("silos.json"), "legal", Path("legal.key.pub"))   # on the coordinator
    conf = proxy_config(host="0.0.0.0", port=9092, upstream_port=9093, certfile=..., keyfile=..., state=...)
    registered_nodes()                                      # in the ServerApp: {node id: silo} or None

Flower 1.42 serves its Fleet (SuperNodes), Control (`flwr run/ls/stop`, node registration) and
Runtime (the ServerApp) APIs on one HTTP port, and TLS there identifies the coordinator, not the
caller. So `fedlm superlink` keeps Flower on 127.0.0.1 and puts nginx in front on the public
address: TLS, and only the Fleet API's paths (and /health) forwarded; everything else gets 403.
The Control and Runtime APIs are then reachable from the coordinator's own machine only.
nginx, not a proxy written here: path normalisation, TLS and slow clients are what it is made for.

A SuperNode in 1.42 cannot present a TLS client certificate (its HTTP client takes none), so a
silo's identity is its SuperNode key: an EC P-384 key pair made on the silo, whose public half
the coordinator binds to the silo's name in its registry (`fedlm silo add`). Flower runs with
`--enable-supernode-auth`: only keys registered through the (loopback-only) Control API may
connect, and every Fleet request is signed with the node's key. `fedlm superlink` registers the
registry's keys at start and writes {node id: silo} where the ServerApp reads it
(`FEDLM_SILO_NODES`), so a silo's name comes from the coordinator, never from the node.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlm.errors import UserError
from fedlm.fileio import write_json, write_text

NODES_ENV = "FEDLM_SILO_NODES"
"""Environment variable naming the {node id: silo} file `fedlm superlink` wrote (inherited by the ServerApp)."""

SILO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

FLEET_PATH = r"^/v1/fleet/[a-z-]+$"
"""The Fleet API's routes in Flower 1.42 (flwr/superlink/routers/fleet/router.py): /v1/fleet/<rpc>."""


# ---------------------------------------------------------------------------------------
# silo keys and the coordinator's registry


def make_silo_key(path: Path) -> Path:
    """Write a new SuperNode key: `path` (OpenSSH private key, mode 600) and `path`.pub; return the .pub."""
    path = Path(path)
    pub = path.with_name(path.name + ".pub")
    for p in (path, pub):
        if p.exists():
            raise UserError(f"{p} exists; keep the key the coordinator registered, or remove it to make a new one")
    key = ec.generate_private_key(ec.SECP384R1())  # the curve Flower's docs use for SuperNode keys
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, even briefly
    with os.fdopen(fd, "wb") as f:
        f.write(private)
        f.flush()
        os.fsync(f.fileno())
    write_text(pub, public.decode() + "\n")
    return pub


def read_public_key(path: Path) -> str:
    """The OpenSSH text of a silo's public key file (an EC key on a NIST curve, as Flower requires)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read the silo's public key ({e.strerror})") from None
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm):
        raise UserError(f"{path}: not an OpenSSH public key; make one on the silo with `fedlm silo key KEY`") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise UserError(f"{path}: not an EC key on a NIST curve; make one with `fedlm silo key KEY`")
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def load_registry(path: Path) -> dict[str, str]:
    """{silo: OpenSSH public key} from the coordinator's registry file (missing file: empty)."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        silos = json.loads(path.read_text())["silos"]
        if not isinstance(silos, dict) or not all(isinstance(v, str) for v in silos.values()):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError, OSError):
        raise UserError(f"{path}: not a silo registry; it is written by `fedlm silo add NAME KEY.pub`") from None
    return dict(silos)


def add_silo(registry: Path, name: str, public_key_file: Path) -> None:
    """Bind `name` to the silo's public key in the registry (a name or a key is registered once)."""
    if not SILO_NAME.match(name):
        raise UserError(f"silo name {name!r}: use letters, digits, - and _ (at most 64)")
    key = read_public_key(public_key_file)
    silos = load_registry(registry)
    if name in silos:
        raise UserError(f"{registry}: silo {name!r} is already registered; remove it with `fedlm silo remove {name}`")
    holder = next((s for s, k in silos.items() if k == key), None)
    if holder is not None:
        raise UserError(f"{public_key_file}: this key is already registered for silo {holder!r}; each silo makes its own")
    silos[name] = key
    write_json(registry, {"silos": dict(sorted(silos.items()))})


def remove_silo(registry: Path, name: str) -> None:
    """Drop `name` from the registry (its node is refused after the SuperLink restarts)."""
    silos = load_registry(registry)
    if name not in silos:
        raise UserError(f"{registry}: no silo {name!r} (registered: {', '.join(sorted(silos)) or 'none'})")
    del silos[name]
    write_json(registry, {"silos": silos})


def load_signing_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A silo's private node key (`make_silo_key`), which also signs its SecAgg round keys."""
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    except OSError as e:
        raise UserError(f"{path}: cannot read the silo's key ({e.strerror})") from None
    except (ValueError, UnsupportedAlgorithm):
        raise UserError(f"{path}: not an OpenSSH private key; make one with `fedlm silo key KEY`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UserError(f"{path}: not an EC key; make one with `fedlm silo key KEY`")
    return key


def pinned_keys(registry: Path) -> dict[str, ec.EllipticCurvePublicKey]:
    """{silo: its registered public key} from a silo's own copy of the registry (`fedlm node --peers`).

    A silo checks its peers' SecAgg round keys against this copy, not against anything the
    server sends, so a coordinator that substitutes keys is caught; the copy must come from a
    channel the silo trusts (compare the keys' fingerprints with the other silos)."""
    if not Path(registry).is_file():
        raise UserError(f"--peers {registry}: no such file; get the coordinator's silos.json and check its keys")
    out = {}
    for silo, text in load_registry(registry).items():
        key = serialization.load_ssh_public_key(text.encode())
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise UserError(f"{registry}: the key of silo {silo!r} is not an EC key")
        out[silo] = key
    return out


def registered_nodes() -> dict[int, str] | None:
    """{node id: silo} registered by `fedlm superlink` (None: no registry, a federation on one machine)."""
    path = os.environ.get(NODES_ENV)
    if not path:
        return None
    try:
        return {int(node): str(silo) for node, silo in json.loads(Path(path).read_text()).items()}
    except (OSError, json.JSONDecodeError, ValueError, AttributeError):
        raise UserError(f"{NODES_ENV}={path}: unreadable node registry; restart `fedlm superlink`") from None


def silos_waiting(node_ids: Iterable[int], silos: Sequence[str], registry: dict[int, str] | None) -> str:
    """What is still missing before round 1 ("" when every configured silo has a node online)."""
    online = set(node_ids)
    if registry is None:  # one machine: nodes name their silos, so count them
        return "" if len(online) >= len(silos) else \
            f"only {len(online)} of {len(silos)} silos' SuperNodes connected"
    unregistered = [s for s in silos if s not in registry.values()]
    if unregistered:
        raise UserError(f"silo {unregistered[0]!r} has no registered key; on the coordinator run "
                        f"`fedlm silo add {unregistered[0]} KEY.pub` and restart `fedlm superlink`")
    absent = [s for s in silos if not any(registry.get(n) == s for n in online)]
    return f"silo {absent[0]!r} has no SuperNode online" if absent else ""


def working_nodes(node_ids: Iterable[int], silos: Sequence[str],
                  registry: dict[int, str] | None) -> tuple[list[int], dict[int, str]]:
    """The nodes to ask for a configured silo, and {node: why it gets no work} for the others."""
    work: list[int] = []
    idle: dict[int, str] = {}
    for node in sorted(set(node_ids)):
        if registry is None or registry.get(node) in silos:
            work.append(node)
        else:
            idle[node] = (f"registered for silo {registry[node]!r}, which this run does not train"
                          if node in registry else "not registered for any silo")
    return work, idle


# ---------------------------------------------------------------------------------------
# the proxy in front of the SuperLink


def nginx_binary() -> str:
    """nginx's path (Debian puts it in /usr/sbin, often off a user's PATH)."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                           if os.access(p, os.X_OK)), None)
    if found is None:
        raise UserError("`fedlm superlink` puts nginx in front of Flower and it is not installed; "
                        "install it (Debian/Ubuntu: `apt-get install nginx`)")
    return found


def proxy_config(*, host: str, port: int, upstream_port: int, certfile: Path, keyfile: Path, state: Path) -> str:
    """nginx.conf: TLS on HOST:PORT, the Fleet API and /health passed to Flower on 127.0.0.1, the rest 403."""
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    tmp = state / "nginx-tmp"
    upstream = f"https://127.0.0.1:{upstream_port}"
    # Forward $uri (the path after nginx has decoded and normalised it, and the regex checked) rather
    # than the raw request line, so "/v1/fleet/../control/..." cannot reach another API upstream.
    # The hop to 127.0.0.1 is TLS because Flower listens with the coordinator's certificate there;
    # it is not verified again: the peer is this machine's own SuperLink.
    return f"""daemon off;
worker_processes 1;
pid {_quoted(state / 'nginx.pid')};
error_log {_quoted(state / 'proxy-error.log')} warn;
events {{ worker_connections 512; }}
http {{
    access_log {_quoted(state / 'proxy-access.log')};
    client_body_temp_path {_quoted(tmp / 'body')};
    proxy_temp_path {_quoted(tmp / 'proxy')};
    fastcgi_temp_path {_quoted(tmp / 'fastcgi')};
    uwsgi_temp_path {_quoted(tmp / 'uwsgi')};
    scgi_temp_path {_quoted(tmp / 'scgi')};
    server_tokens off;
    client_max_body_size 64m;
    proxy_request_buffering off;
    proxy_buffering off;
    proxy_read_timeout 600s;
    proxy_send_timeout 600s;
    server {{
        listen {listen} ssl;
        ssl_certificate {_quoted(certfile)};
        ssl_certificate_key {_quoted(keyfile)};
        ssl_protocols TLSv1.2 TLSv1.3;
        location ~ {FLEET_PATH} {{
            limit_except POST {{ deny all; }}
            proxy_pass {upstream}$uri;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_server_name off;
        }}
        location = /health {{
            limit_except GET {{ deny all; }}
            proxy_pass {upstream}/health;
        }}
        location / {{ return 403; }}
    }}
}}
"""


def _quoted(path: Path) -> str:
    """A path as an nginx string (a quote or backslash in it would end or escape the string)."""
    text = str(path)
    if '"' in text or "\\" in text:
        raise UserError(f"{path}: a path with a quote or backslash cannot go in nginx's config; move it")
    return f'"{text}"'


def proxy_command(conf: Path, state: Path) -> list[str]:
    """Run nginx in the foreground on `conf` (its prefix, pid and logs in `state`)."""
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (state / "nginx-tmp" / sub).mkdir(parents=True, exist_ok=True)
    return [nginx_binary(), "-p", str(state), "-c", str(conf), "-e", str(state / "proxy-error.log")]
