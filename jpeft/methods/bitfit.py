"""BitFit: train only the biases (Ben Zaken, Goldberg & Ravfogel, ACL 2022).

Every weight stays frozen; the bias ``b`` of each targeted layer is trained in full,
``y = x W + b'``. ``jpeft.apply(params, "bitfit", targets=...)`` takes the same kernel
targets as the other methods and makes the ``bias`` next to each targeted ``kernel`` a
:mod:`full <jpeft.methods.full>` node; the kernels are left as they are (``scope="bias"``).
A targeted layer without a bias is refused by name. On Phi-1.5's Q/K/V (24 layers,
hidden 2048) that is 24 · 3 · 2048 = 147,456 trainable parameters.
"""

from __future__ import annotations

import dataclasses

from jpeft.methods import base, full


@dataclasses.dataclass(frozen=True)
class BitfitConfig:
    """No hyper-parameters."""

    def check(self, shape) -> None:
        pass


METHOD = base.Method(BitfitConfig, full.init, full.materialize, full.factored, full.flops, scope="bias")
