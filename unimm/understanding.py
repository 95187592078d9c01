"""Understanding retention in miniature (PS-VAE §4.4 on the Shapes world).

PS-VAE fine-tunes its representation encoder (stage 2) and asks whether an understanding model built on the
*original* encoder still works when the fine-tuned one is swapped in. The paper does it with Bagel (MME-P
1685 -> 1652, LLM frozen). Here the same experiment runs in a few CPU minutes:

- a frozen representation encoder turns a 64 px Shapes image into patch tokens;
- a connector (2x2 patch merge + 2-layer MLP, as Qwen2-VL's merger) maps them to the width of a tiny Qwen2;
- the Qwen2 reads [question tokens, image tokens, "answer:"] and predicts the one-word answer with its LM head
  (cross-entropy on the answer token only);
- questions have exactly checkable answers: `answer_question(scene, text)` is a program that reads the
  question text and computes the answer from the scene graph, so every answer is checked against the scene.

`train_understanding` trains connector + LLM on the original encoder; `retention` swaps in another encoder
(the PS-VAE-fine-tuned one) with LLM and connector frozen, then re-aligns only the connector, and reports
accuracy (exact match of the argmax answer, overall and per question type) for each case, next to the
blind answer prior. Results and commands: docs/understanding.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.shapes.vocabulary import COLORS, NUMBER_WORDS, SHAPE_PLURALS, SHAPES
from unimm.errors import UserError
from unimm.training.schedule import scheduled_lr

MODEL_FILE = "understanding.json"
CONNECTOR_FILE = "connector.safetensors"
LLM_DIR = "llm"

# Colour-only types first: the mini Shapes encoder's features carry colour and count well but shape poorly
# (linear probe of the largest object's shape: 0.38 flatten / 0.40 pooled, majority 0.39; runs/probe-encoder.json).
QUESTION_TYPES: tuple[str, ...] = ("total", "color_count", "color_exists", "shape_count", "color", "shape", "exists")
ANSWER_PROMPT = "answer:"  # ends every sequence; the answer token is predicted after it
# Token order: the question before the image lets image tokens read the question (uniform attention already
# gives them its bag of words), so matching happens per patch before the answer position aggregates.
PROMPTS: tuple[str, ...] = ("question-image", "image-question")
COUNT_WORDS: dict[int, str] = {0: "zero", **NUMBER_WORDS}
_SHAPE_BY_PLURAL = {plural: shape for shape, plural in SHAPE_PLURALS.items()}


@dataclass
class UnderstandingConfig:
    """Everything `unimm understanding train` reads; `key=value` overrides on the command line."""

    resolution: int = 64  # images are rendered at this size; the encoder resizes to its own input size
    num_train_scenes: int = 6000
    num_eval_scenes: int = 500  # every applicable question type is asked once per held-out scene
    # Connector: merge x merge neighbouring patch tokens are concatenated, then a 2-layer MLP to the LLM width.
    merge: int = 2
    prompt: str = "question-image"  # or image-question (LLaVA order); see PROMPTS
    # The tiny Qwen2 (random init; no language pretraining exists in the Shapes world).
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    # Training of connector + LLM on the original encoder.
    # 6000 steps at 5e-4: at 2e-3 / 3000 steps the model learned only `total` (held-out 0.472); at 5e-4 the loss
    # leaves its plateau near step 2000 and every colour question is learned (0.683; docs/understanding.md).
    steps: int = 6000
    batch_size: int = 64
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    # Re-aligning only the connector after the encoder swap (the default of `unimm understanding swap`).
    realign_steps: int = 300
    realign_learning_rate: float = 1e-3
    encode_batch_size: int = 128
    seed: int = 0
    log_every: int = 100

    def validate(self) -> None:
        positive = ("resolution", "num_train_scenes", "num_eval_scenes", "merge", "hidden_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "intermediate_size", "batch_size", "encode_batch_size",
                    "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("steps", "warmup_steps", "realign_steps"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.prompt not in PROMPTS:
            raise UserError(f"prompt must be one of {', '.join(PROMPTS)}, got {self.prompt!r}")
        if self.resolution < 16:
            raise UserError(f"resolution must be at least 16 (the Shapes world's minimum), got {self.resolution}")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise UserError("hidden_size must be a multiple of num_attention_heads, and that of num_key_value_heads")


# ----------------------------------------------------------------------------------------------------
# Questions and the checker
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Question:
    kind: str
    text: str
    answer: str


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _unique(values: list[str]) -> list[str]:
    return sorted(value for value in set(values) if values.count(value) == 1)


def ask(scene, kind: str, rng: np.random.Generator) -> Question | None:
    """One question of `kind` about `scene` (None when the scene has no subject for it), with its answer."""
    shapes = [obj.shape for obj in scene.objects]
    colors = [obj.color for obj in scene.objects]
    if kind == "total":
        text, answer = "how many objects are there?", COUNT_WORDS[len(shapes)]
    elif kind == "color_count":  # half the time a colour that is present, so answers are not mostly "zero"
        color = str(rng.choice(sorted(set(colors)))) if rng.random() < 0.5 else str(rng.choice(COLORS))
        text, answer = f"how many {color} objects are there?", COUNT_WORDS[colors.count(color)]
    elif kind == "color_exists":  # balanced yes / no
        color = str(rng.choice(sorted(set(colors)))) if rng.random() < 0.5 else str(rng.choice(COLORS))
        text, answer = f"is there {_article(color)} {color} object?", "yes" if color in colors else "no"
    elif kind == "shape_count":
        shape = str(rng.choice(sorted(set(shapes)))) if rng.random() < 0.5 else str(rng.choice(SHAPES))
        text, answer = f"how many {SHAPE_PLURALS[shape]} are there?", COUNT_WORDS[shapes.count(shape)]
    elif kind == "color":  # only about a shape that occurs exactly once
        options = _unique(shapes)
        if not options:
            return None
        shape = str(rng.choice(options))
        text, answer = f"what color is the {shape}?", colors[shapes.index(shape)]
    elif kind == "shape":  # only about a colour that occurs exactly once
        options = _unique(colors)
        if not options:
            return None
        color = str(rng.choice(options))
        text, answer = f"what shape is the {color} object?", shapes[colors.index(color)]
    elif kind == "exists":  # balanced: an object of the scene, or a colour-shape pair that is absent
        present = sorted(set(zip(colors, shapes)))
        if rng.random() < 0.5:
            color, shape = present[int(rng.integers(len(present)))]
        else:
            absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
            color, shape = absent[int(rng.integers(len(absent)))]
        text = f"is there {_article(color)} {color} {shape}?"
        answer = "yes" if (color, shape) in present else "no"
    else:
        raise ValueError(f"unknown question type {kind!r}; known: {', '.join(QUESTION_TYPES)}")
    return Question(kind, text, answer)


# Question type -> its pattern; the first that matches wins (so "is there a red object?" is colour existence).
_PATTERNS: tuple[tuple[str, re.Pattern], ...] = (
    ("total", re.compile(r"how many objects are there\?")),
    ("color_count", re.compile(r"how many (\w+) objects are there\?")),
    ("color_exists", re.compile(r"is there an? (\w+) object\?")),
    ("shape_count", re.compile(r"how many (\w+) are there\?")),
    ("color", re.compile(r"what color is the (\w+)\?")),
    ("shape", re.compile(r"what shape is the (\w+) object\?")),
    ("exists", re.compile(r"is there an? (\w+) (\w+)\?")),
)


def _parse(text: str) -> tuple[str, tuple[str, ...]]:
    for kind, pattern in _PATTERNS:
        match = pattern.fullmatch(text.strip().lower())
        if match is not None:
            return kind, match.groups()
    raise ValueError(f"{text!r} is not a question of the Shapes QA language")


def _known(word: str, vocabulary, text: str) -> str:
    if word not in vocabulary:
        raise ValueError(f"unknown word {word!r} in {text!r}")
    return word


def answer_question(scene, text: str) -> str:
    """The checker: parse the question text and compute its answer from the scene graph alone.

    Independent of `ask` (it never sees the answer `ask` wrote); raises ValueError for a question that is not
    in the language or has no single answer (e.g. "what color is the star?" with two stars)."""
    kind, words = _parse(text)
    objects = scene.objects
    if kind == "total":
        return COUNT_WORDS[len(objects)]
    if kind == "color_count":
        color = _known(words[0], COLORS, text)
        return COUNT_WORDS[sum(obj.color == color for obj in objects)]
    if kind == "color_exists":
        color = _known(words[0], COLORS, text)
        return "yes" if any(obj.color == color for obj in objects) else "no"
    if kind == "shape_count":
        shape = _SHAPE_BY_PLURAL[_known(words[0], _SHAPE_BY_PLURAL, text)]
        return COUNT_WORDS[sum(obj.shape == shape for obj in objects)]
    if kind == "exists":
        color, shape = _known(words[0], COLORS, text), _known(words[1], SHAPES, text)
        return "yes" if any(obj.color == color and obj.shape == shape for obj in objects) else "no"
    field, other = ("shape", "color") if kind == "color" else ("color", "shape")
    matches = [obj for obj in objects if getattr(obj, field) == words[0]]
    if len(matches) != 1:
        raise ValueError(f"{text!r} has no single answer: {len(matches)} objects match")
    return getattr(matches[0], other)


def question_type(text: str) -> str:
    """The question type of a question text."""
    return _parse(text)[0]


def applicable_questions(scene, rng: np.random.Generator) -> list[Question]:
    """One question of every type that applies to the scene (the evaluation set asks all of them)."""
    return [question for kind in QUESTION_TYPES if (question := ask(scene, kind, rng)) is not None]


def qa_language() -> list[str]:
    """Every question and answer text of the language (the word tokenizer is trained on these)."""
    texts = [f"how many {plural} are there?" for plural in (*SHAPE_PLURALS.values(), "objects")]
    texts += [f"how many {color} objects are there?" for color in COLORS]
    texts += [f"is there {_article(color)} {color} object?" for color in COLORS]
    texts += [f"what color is the {shape}?" for shape in SHAPES]
    texts += [f"what shape is the {color} object?" for color in COLORS]
    texts += [f"is there {_article(color)} {color} {shape}?" for color in COLORS for shape in SHAPES]
    texts += [*COUNT_WORDS.values(), *COLORS, *SHAPES, "yes", "no", ANSWER_PROMPT]
    return texts


# ----------------------------------------------------------------------------------------------------
# Scenes, images and encoder features
# ----------------------------------------------------------------------------------------------------
def sample_scenes(count: int, seed: int, split: str) -> list:
    """`count` scenes, deterministic per (seed, split); train and eval draw from different streams."""
    from data.shapes.scene import sample_scene

    rng = np.random.default_rng([seed, {"train": 0, "eval": 1}[split]])
    return [sample_scene(rng) for _ in range(count)]


def eval_questions(scenes: list, seed: int) -> list[tuple[int, Question]]:
    """The fixed evaluation set: every applicable question type once per scene, as (scene index, question)."""
    rng = np.random.default_rng([seed, 2])
    return [(index, question) for index, scene in enumerate(scenes) for question in applicable_questions(scene, rng)]


def render_images(scenes: list, resolution: int) -> torch.Tensor:
    """(N, 3, R, R) uint8 renders."""
    from data.shapes.render import render_scene_array

    return torch.from_numpy(np.stack([render_scene_array(scene, resolution) for scene in scenes])).permute(0, 3, 1, 2)


@torch.no_grad()
def encode_images(encoder, images: torch.Tensor, batch_size: int = 128, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 images (N, 3, R, R) -> frozen encoder patch tokens (N, h*w, D), float32 on the CPU."""
    encoder = encoder.to(device).eval()
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = images[start : start + batch_size].to(device).float() / 127.5 - 1.0
        chunks.append(encoder.patch_tokens(pixels).float().cpu())
    return torch.cat(chunks)


def load_encoder(path: str | Path):
    """A RepresentationEncoder from its save_pretrained directory, or the backbone of a saved tokenizer
    (SemanticAutoencoder directory, e.g. a PS-VAE whose stage 2 fine-tuned the encoder)."""
    from tokenizer.encoders import RepresentationEncoder

    directory = Path(path)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserError(f"encoder '{path}' is not a directory with a config.json; pass an encoder or tokenizer save_pretrained directory")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{config_path} is not valid JSON; pass an encoder or tokenizer save_pretrained directory") from None
    if isinstance(config, dict) and "model" in config and "latent_shape" in config:
        from tokenizer.model import SemanticAutoencoder

        backbone = SemanticAutoencoder.from_pretrained(directory).backbone
        if backbone is None:
            raise UserError(f"tokenizer '{path}' has no representation-encoder backbone; pass a tokenizer with encoder role backbone")
        return backbone.eval().requires_grad_(False)
    try:
        encoder = RepresentationEncoder.from_pretrained(str(directory))
    except ValueError as error:
        raise UserError(f"encoder '{path}': {error}") from None
    return encoder.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------
class Connector(nn.Module):
    """Patch tokens (B, g*g, D) -> LLM prefix (B, (g/m)^2, H): concat each m x m block, LayerNorm, 2-layer MLP."""

    def __init__(self, encoder_dim: int, hidden_size: int, merge: int = 2):
        super().__init__()
        self.encoder_dim, self.merge = encoder_dim, merge
        width = encoder_dim * merge * merge
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)
        # The LLM's own initialisation (normal, std 0.02): image tokens start at the scale of word embeddings.
        # With PyTorch's default (~50x larger) they dominate the residual stream, attention cannot write the
        # question into them, and training sits on the answer prior for a long time.
        for linear in (self.fc1, self.fc2):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, count, dim = tokens.shape
        grid, m = math.isqrt(count), self.merge
        if grid * grid != count or grid % m or dim != self.encoder_dim:
            raise ValueError(f"connector for {self.encoder_dim}-d tokens on a grid divisible by {m} got {tuple(tokens.shape)}")
        blocks = tokens.view(batch, grid // m, m, grid // m, m, dim).permute(0, 1, 3, 2, 4, 5)
        return self.fc2(F.gelu(self.fc1(self.norm(blocks.reshape(batch, (grid // m) ** 2, m * m * dim)))))


class UnderstandingModel(nn.Module):
    """Connector + tiny Qwen2ForCausalLM + word tokenizer; the encoder stays outside (frozen, swappable)."""

    def __init__(self, connector: Connector, llm: nn.Module, tokenizer, prompt: str = "question-image"):
        super().__init__()
        if prompt not in PROMPTS:
            raise ValueError(f"unknown prompt layout {prompt!r}; known: {', '.join(PROMPTS)}")
        self.prompt = prompt
        self.connector = connector
        self.llm = llm
        self.tokenizer = tokenizer
        self._ids: dict[str, list[int]] = {}

    @classmethod
    def build(cls, config: UnderstandingConfig, encoder_dim: int) -> UnderstandingModel:
        from transformers import Qwen2ForCausalLM

        from data.shapes.text_model import small_qwen2_config, train_text_tokenizer

        tokenizer = train_text_tokenizer(qa_language())
        llm_config = small_qwen2_config(
            tokenizer, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size, max_position_embeddings=256,
        )
        torch.manual_seed(config.seed)
        llm = Qwen2ForCausalLM(llm_config)
        return cls(Connector(encoder_dim, config.hidden_size, config.merge), llm, tokenizer, config.prompt)

    def token_ids(self, text: str) -> list[int]:
        if text not in self._ids:
            self._ids[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._ids[text]

    def answer_id(self, answer: str) -> int:
        ids = self.token_ids(answer)
        if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
            raise ValueError(f"answer {answer!r} is not one token of the model's vocabulary")
        return ids[0]

    def answer_logits(self, features: torch.Tensor, questions: list[str]) -> torch.Tensor:
        """features (B, N, D) + question texts -> logits of the answer token (B, vocab).

        The sequence is [question, image tokens, "answer:"] (or [image tokens, question, "answer:"] with
        prompt=image-question) and the answer is read at the last position. Questions are left-padded with the pad
        token and nothing is masked: every row of a question type pads identically, so the model sees one
        fixed, deterministic sequence per question."""
        device = features.device
        ids = [self.token_ids(text) for text in questions]
        width = max(len(row) for row in ids)
        padded = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long, device=device)
        for row, row_ids in enumerate(ids):
            padded[row, width - len(row_ids) :] = torch.tensor(row_ids, device=device)
        embed = self.llm.get_input_embeddings()
        text = embed(padded)
        image = self.connector(features).to(text.dtype)
        marker = embed(torch.tensor(self.token_ids(ANSWER_PROMPT), device=device)).expand(len(ids), -1, -1)
        parts = [text, image] if self.prompt == "question-image" else [image, text]
        hidden = self.llm.model(inputs_embeds=torch.cat([*parts, marker], dim=1)).last_hidden_state
        return self.llm.lm_head(hidden[:, -1])

    def save_pretrained(self, directory: str | Path, metadata: dict) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.llm.save_pretrained(str(directory / LLM_DIR))
        self.tokenizer.save_pretrained(str(directory / LLM_DIR))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.connector.state_dict().items()}, str(directory / CONNECTOR_FILE))
        (directory / MODEL_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> tuple[UnderstandingModel, dict]:
        """-> (model, metadata): metadata holds the config, the encoder it was trained on and its metrics."""
        from safetensors.torch import load_file
        from transformers import Qwen2ForCausalLM

        from unimm.models.backbone import load_text_tokenizer

        directory = Path(directory)
        if not (directory / MODEL_FILE).is_file():
            raise UserError(f"'{directory}' has no {MODEL_FILE}; pass a directory written by `unimm understanding train`")
        metadata = json.loads((directory / MODEL_FILE).read_text())
        config = config_from_metadata(metadata)
        llm = Qwen2ForCausalLM.from_pretrained(str(directory / LLM_DIR))
        tokenizer = load_text_tokenizer(str(directory / LLM_DIR))
        connector = Connector(int(metadata["encoder_dim"]), config.hidden_size, config.merge)
        connector.load_state_dict(load_file(str(directory / CONNECTOR_FILE)))
        return cls(connector, llm, tokenizer, config.prompt).eval(), metadata


def config_from_metadata(metadata: dict) -> UnderstandingConfig:
    from unimm.config import config_from_dict

    return config_from_dict(UnderstandingConfig, metadata["config"], source=MODEL_FILE)


# ----------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------
def train_steps(
    model: UnderstandingModel,
    features: torch.Tensor,
    scenes: list,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    connector_only: bool = False,
    seed: int = 0,
    log_every: int = 100,
    log: Callable[[str], None] | None = None,
) -> list[float]:
    """Train on random (scene, question) pairs: connector + LLM, or (connector_only) the connector with the
    LLM frozen. Deterministic per seed. -> the loss of every step."""
    device = next(model.parameters()).device
    model.llm.requires_grad_(not connector_only)
    model.connector.requires_grad_(True)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay, betas=(0.9, 0.98))
    rng = np.random.default_rng([seed, 3, int(connector_only)])
    torch.manual_seed(seed)
    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            # The shared schedule (warm-up counting the step being taken, then a cosine to 0); a warm-up longer
            # than the run is cut to the run, so short runs still reach the peak rate.
            group["lr"] = scheduled_lr(step, learning_rate, "cosine", min(warmup_steps, steps), steps)
        indices = rng.integers(len(scenes), size=batch_size)
        questions = [sample_training_question(scenes[index], rng) for index in indices]
        logits = model.answer_logits(features[torch.from_numpy(indices)].to(device), [q.text for q in questions])
        targets = torch.tensor([model.answer_id(q.answer) for q in questions], device=device)
        loss = F.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if log is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
            recent = losses[-log_every:]
            log(f"step {step + 1}/{steps}  loss {sum(recent) / len(recent):.4f}  ({time.perf_counter() - started:.0f} s)")
    model.eval()
    model.requires_grad_(False)
    return losses


def sample_training_question(scene, rng: np.random.Generator) -> Question:
    """A question of a uniformly drawn type that applies to the scene (the training distribution)."""
    while (question := ask(scene, str(rng.choice(QUESTION_TYPES)), rng)) is None:
        pass
    return question


def score(predictions: list[str], scenes: list, questions: list[tuple[int, Question]]) -> dict:
    """Exact-match accuracy of predicted answers, overall and per question type; the reference answer of every
    question is recomputed from the scene graph by the checker (`answer_question`)."""
    correct: dict[str, int] = {kind: 0 for kind in QUESTION_TYPES}
    total: dict[str, int] = {kind: 0 for kind in QUESTION_TYPES}
    for (index, question), predicted in zip(questions, predictions, strict=True):
        kind = question_type(question.text)
        total[kind] += 1
        correct[kind] += int(predicted == answer_question(scenes[index], question.text))
    count = sum(total.values())
    return {
        "accuracy": sum(correct.values()) / max(1, count),
        "per_type": {kind: correct[kind] / total[kind] for kind in QUESTION_TYPES if total[kind]},
        "num_questions": count,
    }


@torch.no_grad()
def evaluate(model: UnderstandingModel, features: torch.Tensor, scenes: list, questions: list[tuple[int, Question]],
             batch_size: int = 256) -> dict:
    """`score` of the model's argmax answers (its image features: `features[scene index]`)."""
    device = next(model.parameters()).device
    model.eval()
    predictions: list[str] = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        indices = torch.tensor([index for index, _ in chunk])
        tokens = model.answer_logits(features[indices].to(device), [q.text for _, q in chunk]).argmax(-1).tolist()
        predictions += [model.tokenizer.convert_ids_to_tokens(int(token)) for token in tokens]
    return score(predictions, scenes, questions)


def answer_prior(scenes: list, samples: int, seed: int = 0) -> dict[str, str]:
    """The blind baseline: the most frequent answer of each question text over `samples` training questions
    (what a model that ignores the image can at best learn; ties go to the alphabetically first answer)."""
    rng = np.random.default_rng([seed, 4])
    counts: dict[str, dict[str, int]] = {}
    for index in rng.integers(len(scenes), size=samples):
        question = sample_training_question(scenes[index], rng)
        answers = counts.setdefault(question.text, {})
        answers[question.answer] = answers.get(question.answer, 0) + 1
    return {text: min(answers, key=lambda answer: (-answers[answer], answer)) for text, answers in counts.items()}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device '{name}' is not a torch device; pass cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA device is available; pass --device cpu")
    return device


def _data(config: UnderstandingConfig):
    train_scenes = sample_scenes(config.num_train_scenes, config.seed, "train")
    eval_scenes = sample_scenes(config.num_eval_scenes, config.seed, "eval")
    return train_scenes, eval_scenes, eval_questions(eval_scenes, config.seed)


def train_understanding(config: UnderstandingConfig, encoder_path: str, output_dir: str | Path, device: str = "auto",
                        log: Callable[[str], None] = print) -> dict:
    """Train connector + LLM on a frozen encoder, evaluate on held-out scenes, save to `output_dir`. -> metadata."""
    config.validate()
    device = _device(device)
    started = time.perf_counter()
    encoder = load_encoder(encoder_path)
    torch.manual_seed(config.seed)
    train_scenes, eval_scenes, questions = _data(config)
    log(f"encoding {len(train_scenes)} training and {len(eval_scenes)} held-out scenes with {encoder_path}")
    train_features = encode_images(encoder, render_images(train_scenes, config.resolution), config.encode_batch_size, device)
    eval_features = encode_images(encoder, render_images(eval_scenes, config.resolution), config.encode_batch_size, device)
    model = UnderstandingModel.build(config, train_features.shape[-1]).to(device)
    _check_grid(model, train_features, encoder_path)
    losses = train_steps(model, train_features, train_scenes, steps=config.steps, batch_size=config.batch_size,
                         learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                         warmup_steps=config.warmup_steps, seed=config.seed, log_every=config.log_every, log=log)
    metrics = evaluate(model, eval_features, eval_scenes, questions)
    metadata = {
        "config": dataclasses.asdict(config),
        "encoder": str(encoder_path),
        "encoder_dim": int(train_features.shape[-1]),
        "num_image_tokens": int(train_features.shape[1] // config.merge**2),
        "final_loss": losses[-1] if losses else None,
        "eval": metrics,
        "wall_seconds": time.perf_counter() - started,
        "device": str(device),
    }
    model.cpu().save_pretrained(output_dir, metadata)
    log(f"held-out accuracy {metrics['accuracy']:.4f} on {metrics['num_questions']} questions -> {output_dir}")
    return metadata


def _check_grid(model: UnderstandingModel, features: torch.Tensor, encoder_path: str) -> None:
    count, dim = features.shape[1:]
    grid, merge = math.isqrt(count), model.connector.merge
    if dim != model.connector.encoder_dim:
        raise UserError(f"encoder '{encoder_path}' gives {dim}-d tokens but the connector takes {model.connector.encoder_dim}-d; "
                        "swap in an encoder of the same width")
    if grid * grid != count or grid % merge:
        raise UserError(f"encoder '{encoder_path}' gives {count} patch tokens, not a square grid divisible by merge={merge}")


def retention(model_dir: str | Path, encoder_path: str, realign_steps: int | None = None, device: str = "auto",
              control: bool = False, log: Callable[[str], None] = print) -> dict:
    """The retention experiment on a trained model: the blind answer prior (no image), its own encoder
    (re-evaluated), `encoder_path` swapped in with
    LLM + connector frozen, and `encoder_path` with only the connector re-aligned for `realign_steps` steps.
    `control`: also re-align the connector on the original encoder for as many steps (extra training alone)."""
    import copy

    device = _device(device)
    started = time.perf_counter()
    model, metadata = UnderstandingModel.from_pretrained(model_dir)
    config = config_from_metadata(metadata)
    steps = config.realign_steps if realign_steps is None else realign_steps
    if steps < 0:
        raise UserError(f"--realign-steps must be 0 or more, got {steps}")
    model = model.to(device).requires_grad_(False)
    original_path = metadata["encoder"]
    original, swapped = load_encoder(original_path), load_encoder(encoder_path)
    train_scenes, eval_scenes, questions = _data(config)
    eval_images = render_images(eval_scenes, config.resolution)
    eval_original = encode_images(original, eval_images, config.encode_batch_size, device)
    eval_swapped = encode_images(swapped, eval_images, config.encode_batch_size, device)
    _check_grid(model, eval_swapped, encoder_path)
    drift = {
        "cosine": float(F.cosine_similarity(eval_original, eval_swapped, dim=-1).mean()),
        "relative_l2": float((eval_swapped - eval_original).norm() / eval_original.norm()),
    }
    prior = answer_prior(train_scenes, config.steps * config.batch_size, config.seed)
    blind = [prior.get(question.text, "") for _, question in questions]
    rows = [
        {"encoder": None, "llm": "-", "connector": "-", **score(blind, eval_scenes, questions)},
        {"encoder": original_path, "llm": "trained", "connector": "trained", **evaluate(model, eval_original, eval_scenes, questions)},
        {"encoder": encoder_path, "llm": "frozen", "connector": "frozen", **evaluate(model, eval_swapped, eval_scenes, questions)},
    ]
    realign_kwargs = dict(steps=steps, batch_size=config.batch_size, learning_rate=config.realign_learning_rate,
                          warmup_steps=min(config.warmup_steps, steps // 10), connector_only=True, seed=config.seed,
                          log_every=config.log_every, log=log)
    if steps > 0:
        train_images = render_images(train_scenes, config.resolution)
        train_swapped = encode_images(swapped, train_images, config.encode_batch_size, device)
        realigned = copy.deepcopy(model)
        log(f"re-aligning the connector on {encoder_path} for {steps} steps (LLM frozen)")
        train_steps(realigned, train_swapped, train_scenes, **realign_kwargs)
        rows.append({"encoder": encoder_path, "llm": "frozen", "connector": f"re-aligned ({steps} steps)",
                     **evaluate(realigned, eval_swapped, eval_scenes, questions)})
        if control:
            train_original = encode_images(original, train_images, config.encode_batch_size, device)
            control_model = copy.deepcopy(model)
            log(f"control: re-aligning the connector on {original_path} for {steps} steps (LLM frozen)")
            train_steps(control_model, train_original, train_scenes, **realign_kwargs)
            rows.append({"encoder": original_path, "llm": "frozen", "connector": f"re-aligned ({steps} steps)",
                         **evaluate(control_model, eval_original, eval_scenes, questions)})
    return {"model": str(model_dir), "original_encoder": original_path, "swapped_encoder": encoder_path,
            "realign_steps": steps, "feature_drift": drift, "rows": rows,
            "wall_seconds": time.perf_counter() - started, "device": str(device)}


def format_table(result: dict) -> str:
    """The before/after Markdown table of a `retention` result."""
    header = ["encoder", "LLM", "connector", "accuracy", *QUESTION_TYPES]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    for row in result["rows"]:
        encoder = f"`{row['encoder']}`" if row["encoder"] else "none: answer prior (no image)"
        cells = [encoder, row["llm"], row["connector"], f"{row['accuracy']:.3f}"]
        cells += [f"{row['per_type'][kind]:.3f}" if kind in row["per_type"] else "-" for kind in QUESTION_TYPES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
