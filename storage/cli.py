"""`lorafleet adapters validate|push|ls`: registered on the lorafleet CLI by deploy/cli.py through
add_commands; each command sets `func(args) -> int` (the exit code) on the parsed arguments."""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from collections.abc import Callable

from tqdm import tqdm

from storage.errors import AdapterError
from storage.peft_format import spec_from_adapter
from storage.sources import LocalSource, S3Options, S3Source, is_s3, local_path
from storage.spec import BaseModelSpec
from storage.store import AdapterStore
from storage.weights import LoRAWeights

BAR_MIN_BYTES = 1 << 20  # no progress bar for the small config file


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    adapters = subparsers.add_parser("adapters", help="check, upload and list LoRA adapters (PEFT layout)")
    commands = adapters.add_subparsers(dest="adapters_command", required=True)

    validate = commands.add_parser("validate", help="validate an adapter (folder or URI) against a base model")
    validate.add_argument("source", help="adapter folder, file:// or s3:// URI")
    validate.add_argument("--base", required=True, help="local HF model folder (its config.json is read)")
    validate.add_argument("--max-rank", type=int, default=64)
    validate.add_argument("--allow-base-mismatch", action="store_true")
    validate.add_argument("--cache-dir", default=None, help="disk cache for s3:// downloads")
    validate.set_defaults(func=validate_command)

    push = commands.add_parser("push", help="validate an adapter folder, then upload it to an s3:// URI")
    push.add_argument("dir", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    push.add_argument("uri", help="destination, s3://bucket/prefix/name")
    push.add_argument("--base", default=None, help="also check against this model folder")
    push.set_defaults(func=push_command)

    ls = commands.add_parser("ls", help="list the adapters under a prefix (s3:// URI or folder)")
    ls.add_argument("uri")
    ls.set_defaults(func=ls_command)

    for command in (validate, push, ls):
        command.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (MinIO, R2, ...)")
        command.add_argument("--region", default=None)


def _exit_code(command: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], int]:
    """0 when the command returns; 1 with the error on stderr for a storage error or bad argument."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            command(args)
        except (AdapterError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    return run


@_exit_code
def validate_command(args: argparse.Namespace) -> None:
    store = AdapterStore(BaseModelSpec.from_pretrained(args.base), cache_dir=args.cache_dir,
                         max_rank=args.max_rank, allow_base_mismatch=args.allow_base_mismatch,
                         s3=_s3_options(args), progress=progress_bar)
    print(describe(store.load(args.source)))


@_exit_code
def push_command(args: argparse.Namespace) -> None:
    if not is_s3(args.uri):
        raise ValueError(f"uri: push destination must be an s3:// URI, got {args.uri!r}")
    folder = local_path(args.dir)
    with tempfile.TemporaryDirectory() as cache_dir:  # a local read puts nothing in the cache
        if args.base:
            store = AdapterStore(BaseModelSpec.from_pretrained(args.base), cache_dir=cache_dir, s3=None)
        else:
            store = AdapterStore(spec_from_adapter(str(folder), folder), cache_dir=cache_dir, s3=None,
                                 max_rank=1 << 30)
        weights = store.load(str(folder))
    S3Source(_s3_options(args)).upload(folder, args.uri, progress_bar)
    print(f"pushed {args.uri}\n{describe(weights)}")


@_exit_code
def ls_command(args: argparse.Namespace) -> None:
    source = S3Source(_s3_options(args)) if is_s3(args.uri) else LocalSource()
    for uri in source.list(args.uri):
        print(uri)


def describe(w: LoRAWeights) -> str:
    layers = sorted({i for m in w.modules for i in range(len(w.lora_b[m])) if w.lora_b[m][i].any()})
    return (f"adapter {w.uri}: rank {w.rank}, alpha {w.alpha:g}, scaling {w.scaling:.4g}, "
            f"modules {','.join(w.modules)}, {len(layers)} layers, {w.nbytes / 1e6:.1f} MB, digest {w.digest[:16]}")


def progress_bar(name: str, total: int) -> Callable[[int], None]:
    bar = tqdm(total=total, desc=name, unit="B", unit_scale=True, disable=total < BAR_MIN_BYTES, file=sys.stderr)

    def update(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()
    return update


def _s3_options(args: argparse.Namespace) -> S3Options:
    return S3Options(endpoint_url=args.endpoint_url, region=args.region)


def main(argv: list[str] | None = None) -> int:
    """`python -m storage.cli adapters ...`: the same commands without the rest of the lorafleet CLI."""
    parser = argparse.ArgumentParser(prog="lorafleet")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
