"""An estimate of the GPU memory ssl_min needs, computed on the CPU: no GPU is measured here.

    python benchmarks/memory.py                                   # the defaults: batch 512 x 4 views, d = 128
    python benchmarks/memory.py --batch-size 256 --probe-views 16  # another setting

Training keeps, from the forward pass to the backward pass, the tensors autograd saves: they are counted here (each
storage once) on a small batch under float16 autocast, the precision of a GPU without bf16 (bf16 takes the same
bytes), and scaled to the batch. Added to them: the weights, their gradients and Adam's two moments (float32), the
data set on the device (uint8) and the augmented views of a batch (float32). The evaluation's peak is taken as three
times the largest activation of one forward pass of `features` (1024 images x probe views, no graph kept). Not
counted: the CUDA context (about 0.3-0.5 GB), cuDNN's workspaces and the allocator's slack, hence a margin.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ssl_min  # noqa: E402

GB = 1e9


def saved_bytes_per_view(net: ssl_min.SSLNet, views: int = 2, batch: int = 16) -> float:
    """Bytes autograd keeps for the backward pass, per augmented view, under float16 autocast."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.rand(views * batch, 3, 32, 32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.float16):
        z = net(x).view(views, batch, -1)
        ssl_min.ssl_loss(z, 0.01)
    return sum(storages.values()) / (views * batch)


def largest_activation_bytes(backbone: torch.nn.Module, images: int) -> int:
    """The largest output of any layer in one forward pass of `images` images under float16 autocast."""
    sizes = []

    def record(module, inputs, output):
        sizes.append(output.nbytes)

    hooks = [m.register_forward_hook(record) for m in backbone.modules() if not list(m.children())]
    with torch.no_grad(), torch.autocast("cpu", torch.float16):
        backbone(torch.rand(8, 3, 32, 32))
    for h in hooks:
        h.remove()
    return max(sizes) * images // 8


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--proj-dim", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--probe-views", type=int, default=16)
    parser.add_argument("--images", type=int, default=60_000, help="the data set on the device (CIFAR-10: 60,000)")
    args = parser.parse_args()
    net = ssl_min.SSLNet(args.proj_dim, torch.zeros(3), torch.ones(3), args.width)
    n_views = args.batch_size * args.views
    parts = dict(activations=saved_bytes_per_view(net) * n_views,
                 weights_gradients_adam=16 * sum(p.numel() for p in net.parameters()),
                 data=args.images * 3 * 32 * 32, views=n_views * 3 * 32 * 32 * 4)
    train = sum(parts.values())
    evaluation = 3 * largest_activation_bytes(net.backbone, 1024 * args.probe_views) + parts["data"]
    print(f"estimate for batch {args.batch_size} x {args.views} views, d = {args.proj_dim}, width {args.width}, "
          f"probe views {args.probe_views} (computed, not measured):")
    for name, size in parts.items():
        print(f"  training: {name:24s} {size / GB:7.3f} GB")
    print(f"  training in all            {train / GB:7.3f} GB\n  evaluation peak            {evaluation / GB:7.3f} GB")


if __name__ == "__main__":
    main()
