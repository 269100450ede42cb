"""A SAM vit_b file in Meta's layout through load -> adapt -> train -> save -> load -> predict, at img_size 256.

No pretrained SAM weights can be downloaded here, so the file holds random values in the exact key layout
of ``sam_vit_b_01ec64.pth`` (``segment_anything.sam_model_registry["vit_b"](checkpoint=None)``, position
tables filled with noise so that their resampling is not trivially zero). With a real file, pass its path::

    python scripts/sam_pipeline.py                          # random vit_b in Meta's layout
    python scripts/sam_pipeline.py --checkpoint sam_vit_b_01ec64.pth --method lora --steps 10

Steps: SAMSegmenter(variant=vit_b, img_size=256, out_channels=2) loads the file (64x64 -> 16x16 position
embedding, global blocks' 127 -> 31 relative tables; the class tokens built afresh for 2 classes);
``--method`` (salt) on the image encoder's qkv, the mask decoder trained in full; ``--steps`` AdamW steps on
random 1-channel images; ``save_adapter``; a fresh model from the same file + ``load_adapter``; the two
predictions compared. Prints the time of each step and the sizes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from segadapt.adapters import AdapterConfig, inject, load_adapter, save_adapter
from segadapt.models import SAMSegmenter, default_train_modules, preset_targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a SAM vit_b file (default: random values in Meta's layout)")
    parser.add_argument("--method", default="salt")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    clock = time.perf_counter()

    def lap(what: str) -> None:
        nonlocal clock
        print(f"{what}: {time.perf_counter() - clock:.1f} s")
        clock = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from segment_anything import sam_model_registry

            torch.manual_seed(0)
            sam = sam_model_registry["vit_b"](checkpoint=None)
            with torch.no_grad():
                for name, param in sam.named_parameters():
                    if "pos" in name:
                        param.normal_(std=0.02)
            checkpoint = Path(tmp) / "sam_vit_b_random.pth"
            torch.save(sam.state_dict(), checkpoint)
            del sam
            lap(f"random vit_b in Meta's layout written ({checkpoint.stat().st_size / 2**20:.0f} MiB)")

        net = SAMSegmenter(in_channels=1, out_channels=2, img_size=args.img_size, variant="vit_b", checkpoint=checkpoint)
        print(f"pos_embed {tuple(net.image_encoder.pos_embed.shape)}, global rel_pos_h "
              f"{tuple(net.image_encoder.blocks[2].attn.rel_pos_h.shape)}, windowed rel_pos_h "
              f"{tuple(net.image_encoder.blocks[0].attn.rel_pos_h.shape)}")
        lap("loaded at img_size %d" % args.img_size)
        config = AdapterConfig(method=args.method, rank=4, lora_rank=4, targets=preset_targets(net, "qkv"),
                               train_modules=default_train_modules(net))
        inject(net, config)
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        print(f"{args.method} on {len(config.targets)} qkv layers + mask decoder trained in full: {trainable:,} trainable "
              f"of {sum(p.numel() for p in net.parameters()):,}")
        lap("adapted")
        torch.manual_seed(1)
        images = torch.randn(args.batch, 1, args.img_size, args.img_size)
        labels = (images[:, 0] > 0.5).long()  # something learnable
        optimiser = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
        net.train()
        losses = []
        for _ in range(args.steps):
            optimiser.zero_grad()
            loss = F.cross_entropy(net(images), labels)
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        print("losses: " + " ".join(f"{x:.3f}" for x in losses))
        lap(f"trained {args.steps} steps (batch {args.batch})")
        net.eval()
        adapter_file = save_adapter(net, Path(tmp) / "sam_adapter.safetensors")
        print(f"adapter file {adapter_file.stat().st_size / 2**20:.1f} MiB")
        lap("saved")
        fresh = SAMSegmenter(in_channels=1, out_channels=2, img_size=args.img_size, variant="vit_b", checkpoint=checkpoint)
        load_adapter(fresh, adapter_file)
        fresh.eval()
        lap("fresh model from the same file + load_adapter")
        with torch.no_grad():
            a, b = net(images), fresh(images)
        print(f"prediction {tuple(a.shape)}: max |trained - reloaded| = {(a - b).abs().max().item():.3g}, "
              f"identical: {torch.equal(a, b)}")
        lap("predicted")
        if not torch.equal(a, b):
            raise SystemExit("error: the reloaded adapter does not reproduce the trained model's prediction")


if __name__ == "__main__":
    main()
