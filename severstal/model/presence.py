"""An image-level presence score per class, trained with the detector, that gates the class masks.

On Severstal an empty (image, class) pair predicted empty scores a whole Dice point, and 83% of the real
sample's pairs are empty: the winning solutions kept them empty with an image classifier per class in front of
the segmentation. :class:`PresenceRCNN` is Detectron2's Mask R-CNN with such a classifier on its own backbone:
each FPN level is pooled (mean and max over the image), a small MLP gives one logit per class, and a binary
cross-entropy on "the (augmented) training image holds an instance of the class" joins the detector's losses.

A model built from a config with ``MODEL.META_ARCHITECTURE: "PresenceRCNN"`` has the head; its probabilities
travel with the detections (:class:`severstal.model.backends.RawOutput` ``presence``, an output of the exported
graph) and ``severstal.model.predict.make_record`` empties a class mask whose probability is under the class's
``SEVERSTAL.PRESENCE_THRESHOLDS`` (tuned with the score thresholds). Registering the class with Detectron2's
``META_ARCH_REGISTRY`` happens when this module is imported, as Detectron2's own architectures do;
:func:`severstal.model.config.get_severstal_cfg` imports it.

With ``SEVERSTAL.PRESENCE_FOREST_TREES`` > 0 the probabilities come instead from a separate small classifier, a
random forest per class on :func:`texture_features` of the network's input (edge and intensity statistics at
three scales), fitted with scikit-learn on the training images once the detector is trained
(:func:`fit_presence_forest`). From a hundred real strips it tells the classes apart far better than the head on
a backbone trained from random weights (docs/real-steel.md). Its trees live in the model's state dict as
fixed-shape tensors (:class:`PresenceForest`), so the checkpoint, the ONNX graph and both servers carry it.

With ``SEVERSTAL.SEMANTIC_HEAD`` the model also has Detectron2's own per-pixel head (``SemSegFPNHead``, configured
by ``MODEL.SEM_SEG_HEAD``: background and one channel per class, softmax) on the same FPN, trained on the class
label map of each training image (:func:`semantic_targets`). Its probabilities at a quarter of the input size
(:meth:`PresenceRCNN.class_probs`, the graph's ``class_probs`` output) then make the class masks, at the tuned
``SEVERSTAL.PIXEL_THRESHOLDS``: from a few real strips a dense head learns long, thin and large defects far
better than instance masks of 28x28 in proposals that must first be found (docs/real-steel.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, build_sem_seg_head
from torch import nn

PRESENCE_ARCH = "PresenceRCNN"


class PresenceHead(nn.Module):
    """Pooled feature maps -> one logit per class.

    Args:
        channels: channels of each input feature map.
        num_classes: logits out.
        hidden: width of the hidden layer.
    """

    def __init__(self, channels: list[int], num_classes: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * sum(channels), hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, num_classes))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """(B, C_i, H_i, W_i) maps -> (B, num_classes) logits."""
        pooled = [torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1) for f in features]
        return self.mlp(torch.cat(pooled, dim=1))


TOP_FRACTIONS = (0.1, 0.01, 0.001)
"""The means of the largest values of each texture map that :func:`texture_features` keeps, as fractions of it."""
TEXTURE_SCALES = (1, 2, 4)
NUM_TEXTURE_FEATURES = 4 + 3 * len(TEXTURE_SCALES) * (1 + len(TOP_FRACTIONS))


def _top_means(values: torch.Tensor, fractions: Sequence[float] = TOP_FRACTIONS) -> list[torch.Tensor]:
    """(B, N) -> [mean, then the mean of the largest ``fraction`` of the values for each fraction], each (B,)."""
    return [values.mean(1)] + [values.topk(max(1, int(values.shape[1] * f)), dim=1).values.mean(1)
                               for f in fractions]


def texture_features(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) network input -> (B, :data:`NUM_TEXTURE_FEATURES`) image statistics.

    Of the grey image: mean, spread and the means of its darkest and brightest 1%; at 1, 1/2 and 1/4 of the size,
    of the absolute horizontal and vertical differences and of the difference from a 5x5 local mean: the mean
    and the means of the largest 10%, 1% and 0.1% (defects are rare, strong edges and spots).
    """
    grey = images.float().mean(1, keepdim=True)
    flat = grey.flatten(1)
    features = [flat.mean(1), flat.std(1), -_top_means(-flat, (0.01,))[1], _top_means(flat, (0.01,))[1]]
    for scale in TEXTURE_SCALES:
        x = F.avg_pool2d(grey, scale) if scale > 1 else grey
        across = (x[..., 1:] - x[..., :-1]).abs()
        along = (x[..., 1:, :] - x[..., :-1, :]).abs()
        spots = (x - F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)).abs()
        for values in (across, along, spots):
            features += _top_means(values.flatten(1))
    return torch.stack(features, dim=1)


class PresenceForest(nn.Module):
    """Random forests (one per class) as complete binary trees of fixed depth, evaluated with tensor operations.

    A tree of depth ``D`` has ``2**D - 1`` split nodes (heap order: the children of ``n`` are ``2n + 1``, left for
    ``x[feature] <= threshold``, and ``2n + 2``) and ``2**D`` leaves holding the probability of the class. Shallower
    branches of a fitted tree are padded with splits that always go left (threshold +inf) down to copies of their
    leaf. The shapes depend only on the config, so the trees load from a state dict and trace into ONNX.
    """

    def __init__(self, num_classes: int, trees: int, depth: int):
        super().__init__()
        self.depth = depth
        splits = 2**depth - 1
        self.register_buffer("feature", torch.zeros(num_classes, trees, splits, dtype=torch.long))
        self.register_buffer("threshold", torch.full((num_classes, trees, splits), float("inf")))
        self.register_buffer("leaf", torch.zeros(num_classes, trees, splits + 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F) features -> (B, num_classes) probabilities: each class's mean leaf over its trees."""
        shape = (features.shape[0], *self.feature.shape)  # (B, classes, trees, splits)
        node = torch.zeros(shape[:3], dtype=torch.long, device=features.device)
        for _ in range(self.depth):
            at = node.unsqueeze(3)
            feature = self.feature.expand(shape).gather(3, at).squeeze(3)
            threshold = self.threshold.expand(shape).gather(3, at).squeeze(3)
            value = features.gather(1, feature.flatten(1)).view(shape[:3])
            node = 2 * node + 1 + (value > threshold).long()
        leaf = (node - shape[3]).unsqueeze(3)
        return self.leaf.expand(*shape[:3], shape[3] + 1).gather(3, leaf).squeeze(3).mean(2)

    def load_forest(self, index: int, estimators: Sequence) -> None:
        """Copy scikit-learn decision trees (fitted on 0/1 labels of class ``index``) into this class's trees."""
        if len(estimators) != self.feature.shape[1]:
            raise ValueError(f"{len(estimators)} trees for a forest of {self.feature.shape[1]}")
        for t, estimator in enumerate(estimators):
            tree = estimator.tree_
            if tree.max_depth > self.depth:
                raise ValueError(f"a tree of depth {tree.max_depth} in a forest of depth {self.depth}")
            positive = list(estimator.classes_).index(1)
            self._copy_node(index, t, tree, 0, 0, 0, positive)

    def _copy_node(self, index: int, t: int, tree, source: int, node: int, level: int, positive: int) -> None:
        if level < self.depth and tree.children_left[source] != -1:
            self.feature[index, t, node] = int(tree.feature[source])
            self.threshold[index, t, node] = float(tree.threshold[source])
            self._copy_node(index, t, tree, tree.children_left[source], 2 * node + 1, level + 1, positive)
            self._copy_node(index, t, tree, tree.children_right[source], 2 * node + 2, level + 1, positive)
            return
        counts = tree.value[source, 0]
        self._fill(index, t, node, level, float(counts[positive] / counts.sum()))

    def _fill(self, index: int, t: int, node: int, level: int, probability: float) -> None:
        if level == self.depth:
            self.leaf[index, t, node - self.feature.shape[2]] = probability
            return
        self.threshold[index, t, node] = float("inf")
        self._fill(index, t, 2 * node + 1, level + 1, probability)
        self._fill(index, t, 2 * node + 2, level + 1, probability)


@META_ARCH_REGISTRY.register()
class PresenceRCNN(GeneralizedRCNN):
    """Mask R-CNN with :class:`PresenceHead` on the backbone (config keys ``SEVERSTAL.PRESENCE_*``), and
    optionally the per-pixel head (``SEVERSTAL.SEMANTIC_HEAD``).

    Training adds ``loss_presence`` (and ``loss_sem_seg``) to the detector's losses; inference is Mask R-CNN's,
    and :meth:`presence_probs` and :meth:`class_probs` give the image-level and pixel probabilities from the same
    input and feature maps (the presence from the forest when the config has one).
    """

    @configurable
    def __init__(self, *, presence_in_features: tuple[str, ...], presence_hidden: int, presence_loss_weight: float,
                 num_classes: int, forest_trees: int = 0, forest_depth: int = 6,
                 sem_seg_head: nn.Module | None = None, **kwargs):
        super().__init__(**kwargs)
        self.sem_seg_head = sem_seg_head
        shapes = self.backbone.output_shape()
        self.presence_in_features = tuple(presence_in_features)
        self.presence_loss_weight = presence_loss_weight
        self.num_classes = num_classes
        self.presence_head = PresenceHead([shapes[f].channels for f in self.presence_in_features], num_classes,
                                          presence_hidden)
        self.presence_forest = PresenceForest(num_classes, forest_trees, forest_depth) if forest_trees else None

    @classmethod
    def from_config(cls, cfg):
        args = super().from_config(cfg)
        args.update(presence_in_features=tuple(cfg.SEVERSTAL.PRESENCE_IN_FEATURES),
                    presence_hidden=cfg.SEVERSTAL.PRESENCE_HIDDEN,
                    presence_loss_weight=cfg.SEVERSTAL.PRESENCE_LOSS_WEIGHT,
                    num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES, forest_trees=cfg.SEVERSTAL.PRESENCE_FOREST_TREES,
                    forest_depth=cfg.SEVERSTAL.PRESENCE_FOREST_DEPTH)
        if cfg.SEVERSTAL.SEMANTIC_HEAD:
            args["sem_seg_head"] = build_sem_seg_head(cfg, args["backbone"].output_shape())
        return args

    def presence_logits(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, num_classes) logits from the backbone's feature maps."""
        return self.presence_head([features[f].float() for f in self.presence_in_features])

    def presence_probs(self, images: torch.Tensor, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, num_classes) probabilities that each class is on each image (``images``: the preprocessed batch
        tensor the backbone saw)."""
        if self.presence_forest is not None:
            return self.presence_forest(texture_features(images))
        return torch.sigmoid(self.presence_logits(features))

    def class_probs(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, num_classes, H/4, W/4) probability of each class at each pixel, from the per-pixel head's softmax
        (its background channel left out); at the stride of ``MODEL.SEM_SEG_HEAD.COMMON_STRIDE``."""
        logits = self.sem_seg_head.layers({f: features[f].float() for f in self.sem_seg_head.in_features})
        return torch.softmax(logits, dim=1)[:, 1:]

    def forward(self, batched_inputs):
        if not self.training:
            return super().forward(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        features = self.backbone(images.tensor)
        proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        targets = presence_targets(gt_instances, self.num_classes).to(self.device)
        loss = F.binary_cross_entropy_with_logits(self.presence_logits(features), targets)
        losses = {**detector_losses, **proposal_losses, "loss_presence": loss * self.presence_loss_weight}
        if self.sem_seg_head is not None:
            labels = semantic_targets(gt_instances, images, self.sem_seg_head.ignore_value).to(self.device)
            losses.update(self.sem_seg_head({f: v.float() for f, v in features.items()}, labels)[1])
        return losses


def presence_targets(gt_instances, num_classes: int) -> torch.Tensor:
    """(B, num_classes) float 0/1: whether each image holds an instance of each (0-based) class."""
    targets = torch.zeros(len(gt_instances), num_classes)
    for row, instances in enumerate(gt_instances):
        targets[row, instances.gt_classes.cpu().unique()] = 1.0
    return targets


def semantic_targets(gt_instances, images, ignore_value: int) -> torch.Tensor:
    """(B, H, W) int64 label map of a padded batch (Detectron2 ``ImageList``): 0 background, 1 + the 0-based
    class under each instance mask (a later instance wins where two overlap), ``ignore_value`` on the padding."""
    height, width = images.tensor.shape[-2:]
    labels = torch.full((len(gt_instances), height, width), ignore_value, dtype=torch.long)
    for row, (instances, (h, w)) in enumerate(zip(gt_instances, images.image_sizes)):
        labels[row, :h, :w] = 0
        masks = instances.gt_masks.tensor.cpu() if len(instances) else torch.zeros(0, h, w, dtype=torch.bool)
        for mask, cls in zip(masks, instances.gt_classes.cpu()):
            labels[row, :h, :w][mask[:h, :w]] = int(cls) + 1
    return labels


def fit_presence_forest(model: PresenceRCNN, images: Sequence[torch.Tensor], labels: np.ndarray, seed: int = 0) -> None:
    """Fit the model's forest per class on these images and load its trees into the model.

    Args:
        model: a :class:`PresenceRCNN` built with ``SEVERSTAL.PRESENCE_FOREST_TREES`` > 0.
        images: (3, H, W) float tensors at the network's input size, before normalisation (as
            ``severstal.model.predict.Predictor.preprocess`` gives them).
        labels: (images, num_classes) 0/1: which classes each image holds. A class that every image or none holds
            gets trees that always answer 1 or 0.
    """
    from sklearn.ensemble import RandomForestClassifier

    forest = model.presence_forest
    trees = forest.feature.shape[1]
    with torch.no_grad():
        rows = [texture_features(model.preprocess_image([{"image": image}]).tensor).cpu() for image in images]
    features = torch.cat(rows).numpy()
    labels = np.asarray(labels, dtype=np.int64)
    for index in range(labels.shape[1]):
        if labels[:, index].min() == labels[:, index].max():
            forest.leaf[index] = float(labels[0, index])
            forest.threshold[index] = float("inf")
            continue
        classifier = RandomForestClassifier(trees, max_depth=forest.depth, min_samples_leaf=3, random_state=seed,
                                            n_jobs=1).fit(features, labels[:, index])
        forest.load_forest(index, classifier.estimators_)


def has_presence(model: nn.Module) -> bool:
    """Whether a (possibly DDP-wrapped) model has the presence head."""
    return isinstance(getattr(model, "module", model), PresenceRCNN)


def has_semantic(model: nn.Module) -> bool:
    """Whether a (possibly DDP-wrapped) model has the per-pixel head (``SEVERSTAL.SEMANTIC_HEAD``)."""
    return getattr(getattr(model, "module", model), "sem_seg_head", None) is not None
