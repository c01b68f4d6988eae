"""python -m kernels: add_lora on random data through the reference and the optimised backends; prints
how closely each agrees with the reference and how long it took (on the CPU, Triton runs in its
interpreter, so the timings say nothing about GPU speed)."""

from __future__ import annotations

import time

import torch

from kernels import LoRAMeta, add_lora


def main() -> None:
    on_gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    t, d_in, d_out, slots, rank = (256, 4096, 4096, 8, 16) if on_gpu else (48, 256, 256, 4, 16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(t, d_in, generator=g).to(device, dtype)
    y0 = torch.randn(t, d_out, generator=g).to(device, dtype)
    lora_a = (torch.randn(slots, rank, d_in, generator=g) / d_in**0.5).to(device, dtype)
    lora_b = (torch.randn(slots, d_out, rank, generator=g) / rank**0.5).to(device, dtype)
    slot_ids = torch.randint(-1, slots, (t,), generator=g, dtype=torch.int32).to(device)
    scalings = torch.full((slots,), 2.0, device=device)
    meta = LoRAMeta.build(slot_ids, slots)
    print(f"add_lora on {device} ({dtype}): T={t} rows, in={d_in}, out={d_out}, {slots} adapter slots of "
          f"rank {rank}, {int((slot_ids < 0).sum())} rows without adapter")
    backends = ["torch", "loop", "gather_bmm", "triton_sgmv", "triton_bgmv",
                *(["triton_sgmv_pdl", "cuda"] if on_gpu else [])]
    want = None
    for backend in backends:
        y = y0.clone()
        add_lora(y, x, lora_a, lora_b, slot_ids, scalings, meta=meta, backend=backend)  # warm-up / compile
        y = y0.clone()
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        add_lora(y, x, lora_a, lora_b, slot_ids, scalings, meta=meta, backend=backend)
        if on_gpu:
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        if want is None:
            want = y
        err = ((y.float() - want.float()).norm() / (want.float() - y0.float()).norm()).item()
        print(f"  {backend:12s} {ms:9.2f} ms   relative difference from the reference {err:.1e}")


if __name__ == "__main__":
    main()
