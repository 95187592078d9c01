"""EditReward (TIGER-Lab, ``TIGER-Lab/EditReward-Qwen2.5-VL-7B``): a Qwen2.5-VL reward model for image edits.

Architecture (``EditReward/model/qwen2_5_vl_trainer.py``, config ``EditReward-Qwen2.5-7B-VL.yaml``:
``rm_head_type: ranknet_multi_head``, ``reward_token: special``, ``output_dim: 2``, ``pooling_strategy: mean``):

* the tokenizer of the base model (Qwen/Qwen2.5-VL-7B-Instruct) gets one added special token ``<|Reward|>``
  and the token embeddings / LM head are resized to the new tokenizer length;
* two MLP heads ``rm_heads.head_0`` and ``rm_heads.head_1``, each ``Linear(hidden, 1024) - ReLU - Dropout(0.05)
  - Linear(1024, 16) - ReLU - Linear(16, 2)`` in float32, read the final hidden state at the ``<|Reward|>``
  position and output (mean, log sigma) -- the training loss (``uncertainty``) uses ``exp`` of the second
  output as the standard deviation;
* head 0 reads the "instruction following" prompt, head 1 the "visual quality" prompt (each one user turn:
  the source image, the edited image, the prompt + ``Please provide the overall ratings of this image:
  <|Reward|>``); both images are resized to 256*28*28 pixels (qwen-vl-utils ``smart_resize``, factor 28,
  bicubic); the two heads' outputs are averaged (``pooling_strategy: mean``). The score is the averaged mean
  (an unbounded real); the averaged log sigma is reported beside it.

Checkpoint format (``EditRewardInferencer``): a directory with ``model.safetensors`` or ``model.pth`` holding
the full ``state_dict`` of that model (optionally under a ``"model"`` key), loaded strictly; the processor and
model config come from the base model. Keys are those of ``Qwen2_5_VLForConditionalGeneration``
(``model.language_model.*``, ``model.visual.*``, ``lm_head.*`` in transformers >= 4.52; the older
``model.*`` / ``visual.*`` names are mapped) plus ``rm_heads.head_{0,1}.{0,3,5}.{weight,bias}``.

Assumptions, not checked against the released weights (no network here): the hub checkpoint is in that
format; and the official forward pass computes the language model's rotary positions as plain 1-D sequence
positions -- it calls the language model with ``inputs_embeds`` and no ``input_ids`` / ``image_grid_thw``,
for which transformers (4.52-4.57, the version EditReward pins) falls back to ``attention_mask.cumsum - 1``
for all three M-RoPE axes. This implementation passes those positions explicitly, so it reproduces the
released model's inputs rather than the M-RoPE positions of the base VLM.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from unimm.errors import UserError

REWARD_TOKEN = "<|Reward|>"
IMAGE_FACTOR = 28
IMAGE_PIXELS = 256 * 28 * 28  # min_pixels = max_pixels of EditReward's data collator and inferencer
CHECKPOINT_FILES = ("model.safetensors", "model.pth")
NUM_HEADS = 2
OUTPUT_DIM = 2

# EditReward/dataset/prompts.py and data_collator_qwen_edit.py, verbatim.
INSTRUCTION_EDIT_FOLLOWING = (
    '\n'
    'You are tasked with evaluating an edited image **in comparison with the original source image** based on **Instruction Following & Semantic Fidelity**, and assigning a score from 1 to 4, with 1 being the worst and 4 being the best.  \n'
    'This dimension focuses on how accurately, completely, and exclusively the model executed the given text instruction.\n'
    '\n'
    '**Inputs Provided:**  \n'
    '- Source Image (before editing)  \n'
    '- Edited Image (after applying the instruction)  \n'
    '- Text Instruction  \n'
    '\n'
    '**Sub-Dimensions to Evaluate:**\n'
    '\n'
    '- **Semantic Accuracy:**  \n'
    '  Assess whether the edited content accurately captures the semantics of the instruction. The edited result should precisely match the intended meaning. For example, if the instruction is "replace apples with oranges," the object must clearly be oranges, not other fruits.\n'
    '\n'
    '- **Completeness of Editing:**  \n'
    '  Check whether **all parts** of the instruction are fully executed. For multi-step edits (e.g., "replace a red car with a blue bicycle"), both the color change and the object replacement must be done without omissions.\n'
    '\n'
    '- **Exclusivity of Edit (No Over-Editing):**  \n'
    '  Ensure that only the requested parts are changed. The rest of the image (as seen in the source) should remain unaltered. For example, if the instruction only involves replacing an object, the background, lighting, and unrelated objects should not be unnecessarily modified.\n'
    '\n'
    '**Scoring Criteria:**\n'
    '- **4 (Very Good):** Perfectly accurate, complete, and exclusive execution of the instruction.  \n'
    '- **3 (Relatively Good):** Largely correct, but with minor omissions or slight over-editing.  \n'
    '- **2 (Relatively Poor):** Major misinterpretation, incomplete edits, or noticeable unintended changes.  \n'
    '- **1 (Very Poor):** Instruction ignored or completely wrong execution.\n'
    '\n'
    'Text instruction - {text_prompt}\n'
)

INSTRUCTION_EDIT_QUALITY = (
    '\n'
    'You are tasked with evaluating an edited image **in comparison with the original source image** based on **Visual Quality & Realism**, and assigning a score from 1 to 4, with 1 being the worst and 4 being the best.  \n'
    'This dimension focuses on how realistic, artifact-free, and aesthetically appealing the edited image is, while remaining consistent with the source image.\n'
    '\n'
    '**Inputs Provided:**  \n'
    '- Source Image (before editing)  \n'
    '- Edited Image (after applying the instruction)  \n'
    '- Text Instruction  \n'
    '\n'
    '**Sub-Dimensions to Evaluate:**\n'
    '\n'
    '- **Plausibility & Physical Consistency:**  \n'
    '  Check whether the edit aligns with the laws of physics and the scene context. Lighting, shadows, reflections, perspective, size, and interactions with the environment should all appear natural compared to the source image.\n'
    '\n'
    '- **Artifact-Free Quality:**  \n'
    '  Look for technical flaws such as blur, distortions, pixel misalignment, unnatural textures, or seams around edited regions. High-quality results should be free from such visible artifacts.\n'
    '\n'
    '- **Aesthetic Quality:**  \n'
    '  Evaluate the overall harmony and visual appeal. The image should look natural, balanced, and pleasant. Colors, composition, and atmosphere should enhance the image rather than degrade it.\n'
    '\n'
    '**Scoring Criteria:**\n'
    '- **4 (Very Good):** Perfectly realistic, artifact-free, seamless, and aesthetically pleasing.  \n'
    '- **3 (Relatively Good):** Mostly realistic and clean, with only minor flaws that do not significantly distract.  \n'
    '- **2 (Relatively Poor):** Noticeable physical inconsistencies or visible artifacts that make the edit unnatural.  \n'
    '- **1 (Very Poor):** Severe artifacts, incoherent composition, or visually unusable result.\n'
    '\n'
    'Text instruction - {text_prompt}\n'
)

REWARD_SUFFIX = (
    '\n'
    'Please provide the overall ratings of this image: <|Reward|>\n'
    '\n'
    'END\n'
)


HEAD_PROMPTS = (INSTRUCTION_EDIT_FOLLOWING, INSTRUCTION_EDIT_QUALITY)  # head_0 <- "dim1", head_1 <- "dim2"


def head_prompt(head: int, instruction: str) -> str:
    return HEAD_PROMPTS[head].replace("{text_prompt}", instruction) + REWARD_SUFFIX


def reward_head(hidden_size: int, output_dim: int = OUTPUT_DIM) -> nn.Sequential:
    """One EditReward head (indices 0, 3, 5 carry weights, as in the checkpoint's key names)."""
    return nn.Sequential(nn.Linear(hidden_size, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, output_dim))


def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int = IMAGE_PIXELS,
                 max_pixels: int = IMAGE_PIXELS) -> tuple[int, int]:
    """qwen-vl-utils' rule: sides multiples of ``factor``, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio above 200 ({width}x{height})")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def prepare_image(image: Image.Image, pixels: int = IMAGE_PIXELS) -> Image.Image:
    image = image.convert("RGB")
    height, width = smart_resize(image.height, image.width, IMAGE_FACTOR, pixels, pixels)
    return image.resize((width, height), Image.BICUBIC)


def remap_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint keys -> this model's: drop a DDP ``module.`` prefix, map pre-4.52 Qwen2.5-VL names."""
    mapped = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith("visual."):
            key = "model." + key
        elif key.startswith("model.") and not key.startswith(("model.visual.", "model.language_model.")):
            key = "model.language_model." + key.removeprefix("model.")
        mapped[key] = value
    return mapped


def load_checkpoint_state(directory: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    directory = Path(directory).expanduser()
    for name in CHECKPOINT_FILES:
        path = directory / name
        if path.is_file():
            break
    else:
        raise UserError(f"no EditReward checkpoint in '{directory}': expected {' or '.join(CHECKPOINT_FILES)} (the full state_dict)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    return remap_state_dict(state), path


class EditRewardModel(nn.Module):
    """Qwen2.5-VL backbone (``model``, ``lm_head``) + the reward heads (``rm_heads``), with the checkpoint's key names.

    ``lm_head`` is kept only so the released state_dict loads strictly; scoring never uses it."""

    def __init__(self, config, num_heads: int = NUM_HEADS, output_dim: int = OUTPUT_DIM):
        super().__init__()
        from transformers import Qwen2_5_VLForConditionalGeneration

        backbone = Qwen2_5_VLForConditionalGeneration(config)
        if not hasattr(backbone.model, "language_model"):
            raise UserError("EditReward needs transformers >= 4.52 (the Qwen2.5-VL model with .model.language_model)")
        self.config = config
        self.model = backbone.model
        self.lm_head = backbone.lm_head
        hidden = config.text_config.hidden_size
        self.rm_heads = nn.ModuleDict({f"head_{index}": reward_head(hidden, output_dim) for index in range(num_heads)})

    @property
    def num_heads(self) -> int:
        return len(self.rm_heads)

    def head_outputs(self, head: int, reward_token_id: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """(B, output_dim) of head ``head`` at each sequence's single reward token."""
        positions = attention_mask.long().cumsum(-1) - 1
        positions = positions.masked_fill(attention_mask == 0, 1)
        position_ids = positions.unsqueeze(0).expand(3, -1, -1)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            pixel_values=pixel_values, image_grid_thw=image_grid_thw, use_cache=False).last_hidden_state
        marks = input_ids == reward_token_id
        if not bool((marks.sum(-1) == 1).all()):
            raise ValueError(f"every sequence must hold exactly one {REWARD_TOKEN} token, got counts {marks.sum(-1).tolist()}")
        head_module = self.rm_heads[f"head_{head}"]
        return head_module(hidden[marks].to(next(head_module.parameters()).dtype))


class EditRewardScorer:
    """Batch scoring of (instruction, source image, edited image) triples with a loaded ``EditRewardModel``."""

    def __init__(self, model: EditRewardModel, processor, reward_token_id: int, *, image_pixels: int = IMAGE_PIXELS,
                 batch_size: int = 4, record: dict | None = None):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.reward_token_id = reward_token_id
        self.image_pixels = image_pixels
        self.batch_size = batch_size
        self.record = record or {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, base: str | None = None, *, device: str | None = None, dtype: str | None = None,
                        image_pixels: int = IMAGE_PIXELS, batch_size: int = 4) -> EditRewardScorer:
        """Load ``model.safetensors`` / ``model.pth`` from ``checkpoint``; config and processor from ``base``
        (a directory or hub id of the base Qwen2.5-VL model; default: ``checkpoint`` itself)."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoProcessor

        from eval.judges import config_fingerprint, local_or_hub, resolve_device, resolve_dtype
        from eval.results import file_sha256

        if batch_size < 1 or image_pixels < IMAGE_FACTOR * IMAGE_FACTOR:
            raise UserError(f"batch size must be >= 1 and image pixels >= {IMAGE_FACTOR * IMAGE_FACTOR}")
        checkpoint = Path(checkpoint).expanduser()
        if not checkpoint.is_dir():
            raise UserError(f"EditReward checkpoint directory '{checkpoint}' does not exist")
        state, checkpoint_file = load_checkpoint_state(checkpoint)
        base_name, base_local = local_or_hub(base or str(checkpoint))
        try:
            config = AutoConfig.from_pretrained(base_name)
            processor = AutoProcessor.from_pretrained(base_name)
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"cannot load the base model's config/processor from '{base_name}' ({error.__class__.__name__}: "
                            f"{str(error)[:200]}); pass --base (e.g. a local copy of Qwen/Qwen2.5-VL-7B-Instruct)") from None
        if config.model_type != "qwen2_5_vl":
            raise UserError(f"'{base_name}' is a {config.model_type} model; EditReward's backbone is Qwen2.5-VL")
        processor.tokenizer.padding_side = "right"
        if REWARD_TOKEN not in processor.tokenizer.get_vocab():
            processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        reward_token_id = processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        embed_key = "model.language_model.embed_tokens.weight"
        if embed_key not in state:
            raise UserError(f"{checkpoint_file} has no {embed_key}; not an EditReward Qwen2.5-VL state_dict")
        rows = state[embed_key].shape[0]
        if reward_token_id >= rows:
            raise UserError(f"the {REWARD_TOKEN} token id {reward_token_id} is outside the checkpoint's {rows}-row embedding; "
                            "is --base the model EditReward was trained from?")
        config.text_config.vocab_size = rows
        if hasattr(config, "vocab_size"):
            config.vocab_size = rows
        heads = sorted({int(match.group(1)) for key in state if (match := re.match(r"rm_heads\.head_(\d+)\.", key))})
        if heads != list(range(NUM_HEADS)):
            raise UserError(f"{checkpoint_file} has reward heads {heads}; expected rm_heads.head_0 and head_1 (ranknet_multi_head)")
        output_dim = state["rm_heads.head_0.5.weight"].shape[0]
        with init_empty_weights(include_buffers=False):
            model = EditRewardModel(config, NUM_HEADS, output_dim)
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as error:
            raise UserError(f"{checkpoint_file} does not match the EditReward architecture on '{base_name}' "
                            f"({' '.join(str(error).split())[:400]})") from None
        target = resolve_device(device)
        backbone_dtype = resolve_dtype(dtype, target)
        model.model.to(device=target, dtype=backbone_dtype)
        model.lm_head.to(device=target, dtype=backbone_dtype)
        model.rm_heads.to(device=target, dtype=torch.float32)
        record = {
            "model": "EditReward (Qwen2.5-VL, ranknet_multi_head, <|Reward|> token, head mean pooling)",
            "checkpoint": str(checkpoint_file),
            "checkpoint_sha256": file_sha256(checkpoint_file),
            "base": base_name,
            "base_config_sha256": config_fingerprint(base_name) if base_local else None,
            "dtype": str(backbone_dtype).removeprefix("torch."),
            "image_pixels": image_pixels,
            "positions": "1-D sequence positions on all M-RoPE axes (as the released model's forward)",
            "score": "mean over the 2 heads of output[0]; log_sigma = mean of output[1]",
        }
        return cls(model, processor, reward_token_id, image_pixels=image_pixels, batch_size=batch_size, record=record)

    def describe(self) -> dict[str, Any]:
        return dict(self.record)

    def _batch(self, head: int, triples: Sequence[tuple[str, Image.Image, Image.Image]]) -> dict[str, torch.Tensor]:
        conversations, images = [], []
        for instruction, source, edited in triples:
            conversations.append([{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                                {"type": "text", "text": head_prompt(head, instruction)}]}])
            images += [prepare_image(source, self.image_pixels), prepare_image(edited, self.image_pixels)]
        texts = [self.processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) for conversation in conversations]
        batch = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        return {key: batch[key].to(self.device) for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}

    @torch.no_grad()
    def score_batch(self, triples: Sequence[tuple[str, Image.Image, Image.Image]]) -> list[dict[str, Any]]:
        """One forward pass per head for up to ``batch_size`` triples; ``[{"score", "log_sigma", "heads"}]``."""
        per_head = torch.stack([self.model.head_outputs(head, self.reward_token_id, **self._batch(head, triples)).float()
                                for head in range(self.model.num_heads)])  # (heads, B, output_dim)
        pooled = per_head.mean(0)
        return [{"score": float(pooled[index, 0]), "log_sigma": float(pooled[index, 1]) if pooled.shape[1] > 1 else None,
                 "heads": per_head[:, index].tolist()} for index in range(len(triples))]

    def score(self, triples: Sequence[tuple[str, Image.Image, Image.Image]], progress: bool = False) -> list[dict[str, Any]]:
        from tqdm import tqdm

        results: list[dict[str, Any]] = []
        for start in tqdm(range(0, len(triples), self.batch_size), desc="editreward", disable=not progress):
            results.extend(self.score_batch(triples[start:start + self.batch_size]))
        return results


# ----------------------------------------------------------------------------------------------------
# triples from files
# ----------------------------------------------------------------------------------------------------
def read_triples(path: str | Path) -> list[dict[str, str]]:
    """A JSONL file of ``{"instruction", "source", "edited"}`` (image paths relative to the file; an optional
    ``"id"``)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise UserError(f"triples file '{path}' does not exist; write one JSON object per line with instruction, source, edited")
    rows = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path} line {line_number}: not JSON") from None
        missing = [field for field in ("instruction", "source", "edited") if not isinstance(row.get(field), str)]
        if missing:
            raise UserError(f"{path} line {line_number}: missing {', '.join(missing)} (strings)")
        row = {**row, "id": str(row.get("id", line_number))}
        for field in ("source", "edited"):
            image_path = Path(row[field]).expanduser()
            row[field] = str(image_path if image_path.is_absolute() else path.parent / image_path)
        rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no triples")
    return rows


def score_triples(scorer: EditRewardScorer, rows: Sequence[Mapping[str, Any]], progress: bool = True) -> dict[str, Any]:
    """Score rows with ``instruction`` and either images (``source_image``/``edited_image``) or paths
    (``source``/``edited``). An unreadable image is a failure: counted, listed, and left out of the mean (an
    unbounded reward has no neutral value to stand in for it)."""
    from tqdm import tqdm

    records: list[dict[str, Any]] = []
    ready: list[tuple[dict[str, Any], tuple[str, Image.Image, Image.Image]]] = []
    failures = {"missing_image": 0, "unreadable_image": 0}

    def flush():
        if ready:
            for (record, _), result in zip(ready, scorer.score_batch([triple for _, triple in ready])):
                record.update(result, status="ok")
            ready.clear()

    for row in tqdm(rows, desc="editreward", unit="edit", disable=not progress):
        record: dict[str, Any] = {key: row[key] for key in ("id", "key", "task_type", "language", "instruction") if key in row}
        records.append(record)
        images = []
        for kind in ("source", "edited"):
            image = row.get(f"{kind}_image")
            if image is None:
                path = Path(str(row.get(kind, "")))
                record[kind] = str(path)
                if not path.is_file():
                    record["status"] = "missing_image"
                    break
                try:
                    with Image.open(path) as opened:
                        image = opened.convert("RGB")
                except (OSError, ValueError):
                    record["status"] = "unreadable_image"
                    break
            images.append(image)
        if "status" in record:
            failures[record["status"]] += 1
            continue
        ready.append((record, (str(row["instruction"]), images[0], images[1])))
        if len(ready) == scorer.batch_size:
            flush()
    flush()
    scored = [record["score"] for record in records if record.get("status") == "ok"]
    failures["failed"] = len(records) - len(scored)
    scores = {"editreward_mean": sum(scored) / len(scored) if scored else None, "triples": len(records), "scored": len(scored)}
    return {"scores": scores, "failures": failures, "details": records}
