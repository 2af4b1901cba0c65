"""FID of a diffusion model's unconditional samples against a real split, via torch-fidelity.

torch-fidelity (the ``clsp[fid]`` extra) holds the reference Inception-v3 port that FID numbers in
papers use; torchmetrics' FID wraps the same network, so it is the one backend. Its weights are
downloaded on first use, so the first run needs a network; both checks happen before any sampling.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from clsp.datasets import DEFAULT_DATA_ROOT, get_dataset
from clsp.errors import UserError
from clsp.generate.unet import check_compatible, load_unet, sample_images

_FEATURES = "2048"


class _UInt8Images(Dataset):
    """uint8 ``[N, H, W, 3]`` images as the ``[3, H, W]`` uint8 tensors torch-fidelity reads."""

    def __init__(self, images) -> None:
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def _require_fidelity():
    """torch_fidelity with its Inception weights loadable, or one line saying which is missing."""
    try:
        import torch_fidelity
    except ImportError:
        raise UserError("FID needs torch-fidelity, which is not installed; run: pip install clsp[fid]") from None
    try:
        torch_fidelity.FeatureExtractorInceptionV3("inception-v3-compat", [_FEATURES])
    except Exception as err:  # download failures surface as URLError, OSError or RuntimeError by version
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"FID needs torch-fidelity's Inception-v3 weights, which are not cached and could not be "
                        f"downloaded ({reason}); run once where the network is reachable") from None
    return torch_fidelity


def compute_fid(unet: str, dataset: str, split: str | None = None, num_samples: int = 10_000, steps: int = 100,
                batch_size: int = 256, data_root: str = DEFAULT_DATA_ROOT, seed: int = 0,
                device: str | None = None) -> dict:
    """FID between ``num_samples`` DDIM samples of ``unet`` and the real images of ``dataset``."""
    fidelity = _require_fidelity()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    real = get_dataset(dataset, split=split, root=data_root)
    model, scheduler = load_unet(unet, device)
    check_compatible(model.config, real.image_size)
    fake = sample_images(model, scheduler, num_samples, steps=steps, seed=seed, batch_size=batch_size)
    metrics = fidelity.calculate_metrics(
        input1=_UInt8Images(fake), input2=_UInt8Images(real.array(range(len(real)))), fid=True,
        cuda=device.startswith("cuda"), batch_size=batch_size, verbose=False,
    )
    return {"fid": float(metrics["frechet_inception_distance"]), "num_samples": num_samples,
            "num_real": len(real), "dataset": real.describe(), "unet": unet, "ddim_steps": steps}
