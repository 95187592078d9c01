"""Caption hard negatives: the same words in a binding that no longer describes the image.

A flow-matching model can lower its loss a great deal by reading a caption as a bag of words (which objects,
which colours) and very little by reading how the words bind ("the red circle left of the blue square" against
"the blue circle left of the red square"): at the noise levels where the layout is decided the posterior mean
image barely changes with the binding, so its gradient is a small term among large ones. The miniature model
learned exactly that: its flow loss is the same with a caption's relation or colours swapped
(docs/embedded_default.md, "The binding probe").

This module makes that difference a direct signal. For a caption with a relation word ("left of") the negative
swaps it for its pair ("right of"); for a caption naming two different words of an exchange class (colours) the
negative trades them. The trainer then asks the model to fit the true image better under the true caption than
under the negative, at the same noisy input (`caption_contrast_loss`). Every negative is itself a caption some
other training image carries, so the flow loss on those images keeps the model from simply spoiling its
predictions for the negative wording.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class CaptionContrastConfig:
    # Weight of the caption-contrast term next to the flow loss (0: off, one forward pass per step as before).
    weight: float = 0.0
    # Sharpness of the logistic: the term saturates once the negative's loss exceeds the true caption's by
    # a few / sharpness (per-element mean squared error), so it cannot push the two apart without bound.
    sharpness: float = 100.0
    # Word pairs whose members are exchanged, in either direction ("left", "right"): one occurrence is swapped.
    swap_pairs: list[list[str]] = field(default_factory=list)
    # Classes of words (colours): the first two different members of a class in a caption trade places.
    exchange_classes: list[list[str]] = field(default_factory=list)


def _word_pattern(words: list[str]) -> re.Pattern:
    alternatives = "|".join(re.escape(word) for word in sorted(words, key=len, reverse=True))
    return re.compile(rf"\b({alternatives})\b")


class CaptionNegatives:
    """Builds one hard negative per caption where the config's word pairs or classes allow one."""

    def __init__(self, swap_pairs: list[list[str]], exchange_classes: list[list[str]]):
        self.partner: dict[str, str] = {}
        for pair in swap_pairs:
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ValueError(f"caption-contrast swap pair {pair!r} must be two different words")
            self.partner[pair[0]], self.partner[pair[1]] = pair[1], pair[0]
        self.swap_pattern = _word_pattern(list(self.partner)) if self.partner else None
        self.class_patterns = [_word_pattern(list(words)) for words in exchange_classes if len(set(words)) >= 2]

    def candidates(self, caption: str) -> list[str]:
        """Every hard negative of `caption` (possibly none): one per swappable word and one per exchange class."""
        negatives = []
        if self.swap_pattern is not None:
            for match in self.swap_pattern.finditer(caption):
                negatives.append(caption[: match.start()] + self.partner[match.group(1)] + caption[match.end():])
        for pattern in self.class_patterns:
            matches = list(pattern.finditer(caption))
            first = matches[0] if matches else None
            second = next((m for m in matches[1:] if m.group(1) != first.group(1)), None) if first else None
            if second is not None:
                negatives.append(
                    caption[: first.start()] + second.group(1) + caption[first.end(): second.start()]
                    + first.group(1) + caption[second.end():]
                )
        return [negative for negative in negatives if negative != caption]

    def sample(self, captions: list[str], generator: torch.Generator) -> list[str | None]:
        """One negative per caption, drawn among its candidates with `generator` (None where there is none)."""
        draws = torch.rand(len(captions), generator=generator).tolist()
        out = []
        for caption, draw in zip(captions, draws):
            options = self.candidates(caption) if caption else []
            out.append(options[min(int(draw * len(options)), len(options) - 1)] if options else None)
        return out


def per_sample_flow_loss(predicted_velocity: torch.Tensor, target_velocity: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample, (B, ...) -> (B,)."""
    return (predicted_velocity.float() - target_velocity.float()).pow(2).flatten(1).mean(dim=1)


def caption_contrast_loss(loss_true: torch.Tensor, loss_negative: torch.Tensor, sharpness: float) -> torch.Tensor:
    """softplus(-sharpness * (L_negative - L_true)) - log 2, averaged: 0 when the model cannot tell the captions
    apart, negative once it fits the image better under the true one. Both (B,) per-sample flow losses."""
    margin = loss_negative - loss_true
    return (F.softplus(-sharpness * margin) - torch.log(torch.tensor(2.0))).mean()
