"""Point 7 of the core model: what one domain pack costs on SmolLM2-135M, in parameters and in forward time.

Prints the parameter count of a 4-block pack against the backbone, and the time of one forward pass on the same
batch with and without the domain, side by side, with their ratio.

    python benchmarks/core_forward.py [--blocks 4] [--batch 8] [--length 256] [--repeats 5]
"""

import argparse
import statistics
import time

import torch

from domain_experts import DomainExpertsForCausalLM
from domain_experts.smollm2 import load_smollm2


def timed_forward(model, batch, repeats: int) -> float:
    with torch.no_grad():
        model(**batch)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)

    backbone, tokenizer = load_smollm2()
    model = DomainExpertsForCausalLM.from_backbone(backbone, tokenizer=tokenizer)
    model.add_domain("recipes", num_blocks=args.blocks)
    backbone_params = sum(p.numel() for p in model.backbone.parameters())
    pack_params = sum(p.numel() for p in model.domain_parameters("recipes"))
    print(f"backbone parameters      {backbone_params:>12,}")
    print(f"{args.blocks}-block pack parameters {pack_params:>12,}  ({pack_params / backbone_params:.1%} of the backbone)")
    print(f"composed model           {sum(p.numel() for p in model.parameters()):>12,}  (backbone held once)")

    ids = torch.randint(0, model.config.backbone_vocab_size, (args.batch, args.length))
    base = {"input_ids": ids}
    routed = ids.clone()
    routed[:, 0] = model.control_token_id("recipes")
    domain = {"input_ids": routed}
    torch.set_num_threads(torch.get_num_threads())
    base_time = timed_forward(model, base, args.repeats)
    bare_time = timed_forward(model.backbone, base, args.repeats)
    domain_time = timed_forward(model, domain, args.repeats)
    layers = model.config.num_backbone_layers
    print(f"\nforward, batch {args.batch} x {args.length} tokens (median of {args.repeats}):")
    print(f"  bare backbone            {bare_time * 1000:8.1f} ms  1.00x")
    print(f"  base rows (no domain)    {base_time * 1000:8.1f} ms  {base_time / bare_time:.2f}x")
    print(f"  recipes rows             {domain_time * 1000:8.1f} ms  {domain_time / bare_time:.2f}x"
          f"  (blocks alone would give {(layers + args.blocks) / layers:.2f}x)")


if __name__ == "__main__":
    main()
