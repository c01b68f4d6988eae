"""The `lorafleet` command: `keys` (API keys), `config check` (a serve config), and the
storage package's `adapters` commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import yaml

from deploy.config import ConfigError, load_config
from deploy.keys import add_key, keys_path, read_entries, revoke_keys
from storage.cli import add_commands as add_adapter_commands

APP_IMPORT_PATH = "deploy.app:build_app"


def _keys_add(args: argparse.Namespace) -> int:
    path = keys_path(args.file)
    key = add_key(path, args.tenant)
    print(f"API key for tenant {args.tenant!r} (shown once; only its hash is kept in {path}):", file=sys.stderr)
    print(key)
    return 0


def _keys_ls(args: argparse.Namespace) -> int:
    for e in read_entries(keys_path(args.file)):
        print(f"{e.get('prefix', '?'):10} {e['tenant']:20} {e.get('created', '')}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    removed = revoke_keys(keys_path(args.file), args.prefix)
    if not removed:
        print(f"no key with prefix {args.prefix!r}", file=sys.stderr)
        return 1
    print(f"revoked {removed} key(s)")
    return 0


def _config_check(args: argparse.Namespace) -> int:
    with open(args.path) as f:
        serve_config = yaml.safe_load(f) or {}
    apps = [a for a in serve_config.get("applications", []) if a.get("import_path") == APP_IMPORT_PATH]
    if not apps:
        print(f"{args.path}: no application with import_path {APP_IMPORT_PATH}", file=sys.stderr)
        return 1
    for app in apps:
        config = load_config(app.get("args") or {})
        print(f"{app.get('name', 'default')}: ok ({config.replicas.num_replicas} replica(s), "
              f"router {config.router.policy})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafleet", description="Operate a lorafleet deployment.")
    commands = parser.add_subparsers(dest="command", required=True)

    keys = commands.add_parser("keys", help="API keys of tenants (stored hashed)").add_subparsers(
        dest="keys_command", required=True)
    file_help = "keys file (default: $LORAFLEET_KEYS_FILE or ~/.config/lorafleet/keys.json)"
    add = keys.add_parser("add", help="create a key for a tenant and print it once")
    add.add_argument("tenant")
    add.add_argument("--file", help=file_help)
    add.set_defaults(func=_keys_add)
    ls = keys.add_parser("ls", help="list keys (prefix, tenant, created)")
    ls.add_argument("--file", help=file_help)
    ls.set_defaults(func=_keys_ls)
    revoke = keys.add_parser("revoke", help="remove the key with this prefix")
    revoke.add_argument("prefix")
    revoke.add_argument("--file", help=file_help)
    revoke.set_defaults(func=_keys_revoke)

    config = commands.add_parser("config", help="serve configs").add_subparsers(dest="config_command",
                                                                                 required=True)
    check = config.add_parser("check", help="validate a serve_config.yaml's lorafleet application")
    check.add_argument("path")
    check.set_defaults(func=_config_check)

    add_adapter_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"lorafleet: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
