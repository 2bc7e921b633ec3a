"""CURVE keys for the engine's client socket: make them, load them, put them on sockets.

CurveZMQ (ZeroMQ's own encryption and authentication) does the crypto; pyzmq's `zmq.auth`
writes and reads the key files. Nothing here is hand-rolled.

    zomni keys generate DIR                  DIR/server.key         public: give it to clients
                                             DIR/server.key_secret  the engine's (mode 0600)
    zomni keys generate DIR --client NAME    DIR/clients/NAME.key   public: the engine admits it
                                             DIR/clients/NAME.key_secret   copy it to NAME

(also `python -m zomni.proto.keys generate DIR [--client NAME]`)

Engine: `EngineConfig.curve_keys_dir = DIR` (`--curve-keys-dir DIR`) turns CURVE on for the
client socket. Without DIR/clients/, any client that knows server.key may connect; with it,
only clients whose public key is in it (checked by a ZAP handler, `zmq.auth`). A client
without the right server key gets no answer at all: the handshake fails before any message.
Clients: `EngineClient(address, server_key=...)` takes the server's public key (z85 text,
the server.key file, or DIR); their own key pair is made on the fly unless `client_key` names
a NAME.key_secret file. `keys_from_dir(DIR)` picks both from a client's copy of DIR (what
`zomni frontend --curve-keys DIR` does).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import zmq
import zmq.auth

from .errors import InvalidRequest

SERVER = "server"
CLIENTS_DIR = "clients"
_Z85_KEY_LEN = 40  # a 32-byte CURVE key in z85 text


def generate(directory: str | os.PathLike, client: str | None = None) -> tuple[Path, Path]:
    """Write a key pair: the server's in `directory`, or client `client`'s in
    `directory/clients`; returns (public file, secret file). Refuses to overwrite one."""
    folder = Path(directory) / CLIENTS_DIR if client else Path(directory)
    name = client or SERVER
    if not name.replace("-", "").replace("_", "").isalnum():
        raise InvalidRequest(f"client name {name!r}: use letters, digits, '-' and '_'",
                             param="client")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise InvalidRequest(f"{public} already exists; remove it to make new keys")
    made = zmq.auth.create_certificates(folder, name)
    os.chmod(secret, 0o600)
    return Path(made[0]), Path(made[1])


def check_server_keys(directory: str) -> None:
    """Raise `InvalidRequest` unless `directory` holds a readable server key pair."""
    try:
        load_server_keys(directory)
    except (OSError, ValueError) as e:
        raise InvalidRequest(f"curve_keys_dir {directory!r}: no server key pair ({e}); make "
                             "one with `zomni keys generate DIR`", param="curve_keys_dir") from None


def load_server_keys(directory: str) -> tuple[bytes, bytes]:
    public, secret = zmq.auth.load_certificate(Path(directory) / f"{SERVER}.key_secret")
    if not secret:
        raise ValueError("server.key_secret holds no secret key")
    return public, secret


def public_key(value: str | bytes | os.PathLike) -> bytes:
    """A server's public key from z85 text, a .key / .key_secret file, or a keys directory."""
    if isinstance(value, bytes):
        value = value.decode()
    text = str(value)
    if len(text) == _Z85_KEY_LEN and not os.path.exists(text):
        return text.encode()
    path = Path(text)
    if path.is_dir():
        path = path / f"{SERVER}.key"
    try:
        return zmq.auth.load_certificate(path)[0]
    except (OSError, ValueError) as e:
        raise InvalidRequest(f"no CURVE public key in {text!r}: {e}", param="server_key") from None


def client_key_pair(value: str | os.PathLike | None) -> tuple[bytes, bytes]:
    """(public, secret): from a NAME.key_secret file, or a fresh pair when `value` is None."""
    if value is None:
        return zmq.curve_keypair()
    try:
        public, secret = zmq.auth.load_certificate(value)
    except (OSError, ValueError) as e:
        raise InvalidRequest(f"no CURVE key pair in {str(value)!r}: {e}",
                             param="client_key") from None
    if not secret:
        raise InvalidRequest(f"{str(value)!r} holds no secret key (give NAME.key_secret)",
                             param="client_key")
    return public, secret


def keys_from_dir(directory: str | os.PathLike,
                  client: str | None = None) -> tuple[Path, Path | None]:
    """(server public key file, client secret key file or None) from a keys directory laid
    out as `zomni keys generate` makes it: DIR/server.key, DIR/clients/NAME.key_secret.

    The client key pair is `client`'s, else the only one in DIR/clients/; None (a fresh pair
    per connection) when there is none, which an engine without DIR/clients/ admits."""
    folder = Path(directory)
    server = folder / f"{SERVER}.key"
    if not server.is_file():
        raise InvalidRequest(f"no {server.name} in {str(folder)!r}: copy the engine's there "
                             "(`zomni keys generate DIR` makes it)", param="curve_keys_dir")
    secrets = sorted((folder / CLIENTS_DIR).glob("*.key_secret"))
    if client is not None:
        secret = folder / CLIENTS_DIR / f"{client}.key_secret"
        if not secret.is_file():
            raise InvalidRequest(f"no client key pair {client!r} in {str(folder)!r} (make it "
                                 f"with `zomni keys generate DIR --client {client}`)",
                                 param="curve_client")
        return server, secret
    if len(secrets) > 1:
        names = ", ".join(s.name[:-len(".key_secret")] for s in secrets)
        raise InvalidRequest(f"{str(folder / CLIENTS_DIR)!r} holds several client key pairs "
                             f"({names}): name one (--curve-client NAME)", param="curve_client")
    return server, (secrets[0] if secrets else None)


def apply_server(sock: zmq.Socket, directory: str):
    """Make `sock` (before it binds) a CURVE server with `directory`'s keys. Returns the ZAP
    authenticator admitting only DIR/clients/*.key when that folder exists (stop it before the
    context terminates), else None."""
    authenticator = None
    clients = Path(directory) / CLIENTS_DIR
    if clients.is_dir():
        from zmq.auth.thread import ThreadAuthenticator

        authenticator = ThreadAuthenticator(sock.context)
        authenticator.start()
        authenticator.configure_curve(domain="*", location=str(clients))
    public, secret = load_server_keys(directory)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    return authenticator


def apply_client(sock: zmq.Socket, server_key: str | bytes | os.PathLike,
                 client_key: str | os.PathLike | None = None) -> None:
    """Make `sock` (before it connects) a CURVE client of the server with `server_key`."""
    sock.curve_serverkey = public_key(server_key)
    sock.curve_publickey, sock.curve_secretkey = client_key_pair(client_key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zomni keys", description="CURVE keys for the "
                                     "engine's client socket")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write a server key pair (or a client's) to DIR")
    gen.add_argument("directory", metavar="DIR")
    gen.add_argument("--client", metavar="NAME", help="a client key pair in DIR/clients/ "
                     "instead: once that folder exists, only its clients may connect")
    args = parser.parse_args(argv)
    try:
        public, secret = generate(args.directory, args.client)
    except InvalidRequest as e:
        parser.exit(2, f"zomni keys: error: {e}\n")
    if args.client:
        print(f"public key: {public} (the engine admits this client)")
        print(f"secret key: {secret} (copy it to the client; keep it private)")
    else:
        print(f"public key: {public} (give it to clients)")
        print(f"secret key: {secret} (the engine's; keep it private)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
