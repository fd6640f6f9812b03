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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
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


@META_ARCH_REGISTRY.register()
class PresenceRCNN(GeneralizedRCNN):
    """Mask R-CNN with :class:`PresenceHead` on the backbone (config keys ``SEVERSTAL.PRESENCE_*``).

    Training adds ``loss_presence`` to the detector's losses; inference is Mask R-CNN's, and
    :meth:`presence_probs` gives the probabilities from the same feature maps.
    """

    @configurable
    def __init__(self, *, presence_in_features: tuple[str, ...], presence_hidden: int, presence_loss_weight: float,
                 num_classes: int, **kwargs):
        super().__init__(**kwargs)
        shapes = self.backbone.output_shape()
        self.presence_in_features = tuple(presence_in_features)
        self.presence_loss_weight = presence_loss_weight
        self.num_classes = num_classes
        self.presence_head = PresenceHead([shapes[f].channels for f in self.presence_in_features], num_classes,
                                          presence_hidden)

    @classmethod
    def from_config(cls, cfg):
        args = super().from_config(cfg)
        args.update(presence_in_features=tuple(cfg.SEVERSTAL.PRESENCE_IN_FEATURES),
                    presence_hidden=cfg.SEVERSTAL.PRESENCE_HIDDEN,
                    presence_loss_weight=cfg.SEVERSTAL.PRESENCE_LOSS_WEIGHT,
                    num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        return args

    def presence_logits(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, num_classes) logits from the backbone's feature maps."""
        return self.presence_head([features[f].float() for f in self.presence_in_features])

    def presence_probs(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, num_classes) probabilities that each class is on each image."""
        return torch.sigmoid(self.presence_logits(features))

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
        return {**detector_losses, **proposal_losses, "loss_presence": loss * self.presence_loss_weight}


def presence_targets(gt_instances, num_classes: int) -> torch.Tensor:
    """(B, num_classes) float 0/1: whether each image holds an instance of each (0-based) class."""
    targets = torch.zeros(len(gt_instances), num_classes)
    for row, instances in enumerate(gt_instances):
        targets[row, instances.gt_classes.cpu().unique()] = 1.0
    return targets


def has_presence(model: nn.Module) -> bool:
    """Whether a (possibly DDP-wrapped) model has the presence head."""
    return isinstance(getattr(model, "module", model), PresenceRCNN)
