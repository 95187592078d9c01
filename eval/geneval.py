"""GenEval (Ghosh et al., 2023) for unimm pipelines: generation in the official layout and the unimm evaluator.

Generation (:func:`generate_geneval`) writes the folder that GenEval's own ``evaluation/evaluate_images.py``
reads::

    <out>/<index:05d>/metadata.jsonl     the prompt's ORIGINAL metadata line (one JSON object)
    <out>/<index:05d>/samples/<k:04d>.png
    <out>/generation.json               the protocol record (prompt-file hashes, steps, cfg, shift, seed, size)

Prompts come from the original metadata file or from a line-aligned rewrite of it (Bagel's long prompts:
same tag / include / exclude on every line, only ``prompt`` differs); the folder always holds the original
line, so the official evaluator scores the original task. Image ``k`` of every prompt uses seed ``seed + k``
(GenEval re-seeds every prompt). Finished images are never generated again: a rerun continues where the
last one stopped.

Evaluation (:func:`evaluate_geneval_folder`) applies GenEval's rules (``eval.geneval_rules``) on top of a
``transformers`` Mask2Former (COCO instance) detector and CLIP colour classifier. Its numbers are reported as
"GenEval (unimm evaluator)": official GenEval numbers come from the official mmdet evaluator, which reads the
same folder.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from eval.geneval_rules import GENEVAL_TAGS, POSITION_THRESHOLD, Detection, evaluate_spec, summarize
from unimm.errors import UserError

EVALUATOR_NAME = "GenEval (unimm evaluator)"
OFFICIAL_NOTE = (
    "Official GenEval numbers come from the official mmdet evaluator (djghosh13/geneval "
    "evaluation/evaluate_images.py: mmdet Mask2Former Swin-S COCO + open_clip ViT-L-14), which reads this same "
    "folder. The unimm evaluator applies the same rules on a transformers Mask2Former and CLIP; its numbers are "
    "close to, not interchangeable with, official ones."
)
DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"

THRESHOLD = 0.3  # a detection is kept when its score is above this ...
COUNTING_THRESHOLD = 0.9  # ... or above this for counting prompts
MAX_OBJECTS = 16  # per class, the most confident first
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = ("a photo of a {color} {object}", "a photo of a {color}-colored {object}", "a photo of a {color} object")
CROP_BACKGROUND = "#999"  # GenEval composites the object's mask onto this grey, then crops to the box
# GenEval's object_names.txt: the 80 COCO classes in COCO's order, three of them renamed.
GENEVAL_OBJECTS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
# Other spellings of the COCO classes found in detector label maps -> GenEval's names.
LABEL_ALIASES = {
    "mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard", "motorbike": "motorcycle",
    "aeroplane": "airplane", "sofa": "couch", "pottedplant": "potted plant", "diningtable": "dining table",
    "tvmonitor": "tv", "tv monitor": "tv", "hair dryer": "hair drier", "cellphone": "cell phone",
    "teddybear": "teddy bear", "doughnut": "donut", "hotdog": "hot dog", "wineglass": "wine glass",
}

GENERATION_FILE = "generation.json"
METADATA_FILE = "metadata.jsonl"
SAMPLES_DIR = "samples"
SAMPLE_PATTERN = re.compile(r"\d+\.png")  # what the official evaluator reads (re.match)
# Settings that must agree before a rerun may add images to an existing output folder.
PROTOCOL_KEYS = ("metadata_sha256", "long_prompts_sha256", "images_per_prompt", "seed", "steps", "cfg", "shift", "resolution")


# ----------------------------------------------------------------------------------------------------
# Prompt files
# ----------------------------------------------------------------------------------------------------
def read_metadata(path: str | Path, what: str = "metadata file") -> tuple[list[str], list[dict]]:
    """(raw lines, parsed specs) of a GenEval metadata JSONL; blank lines are ignored."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{what} '{path}' does not exist; pass GenEval's evaluation_metadata.jsonl (one JSON object per line)")
    lines, specs = [], []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            spec = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path} line {number}: not JSON; a GenEval {what} has one JSON object per line") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("prompt"), str) or "tag" not in spec or not isinstance(spec.get("include"), list):
            raise UserError(f"{path} line {number}: not a GenEval prompt (needs 'prompt', 'tag' and an 'include' list)")
        lines.append(line.strip())
        specs.append(spec)
    if not specs:
        raise UserError(f"{what} '{path}' holds no prompts")
    return lines, specs


def _task(spec: dict) -> dict:
    return {key: value for key, value in spec.items() if key != "prompt"}


def read_prompts(metadata_path: str | Path, long_prompts_path: str | Path | None = None) -> tuple[list[str], list[dict], list[str]]:
    """(original metadata lines, original specs, the prompts to generate from).

    A long-prompt file must be line-aligned with the metadata file: the same number of prompts and, line by
    line, the same tag / include / exclude; only ``prompt`` may differ."""
    lines, specs = read_metadata(metadata_path)
    if long_prompts_path is None:
        return lines, specs, [spec["prompt"] for spec in specs]
    _, long_specs = read_metadata(long_prompts_path, "long-prompt file")
    if len(long_specs) != len(specs):
        raise UserError(f"the long-prompt file '{long_prompts_path}' has {len(long_specs)} prompts but the metadata file "
                        f"'{metadata_path}' has {len(specs)}; they must be line-aligned (one long prompt per metadata line)")
    for index, (spec, long_spec) in enumerate(zip(specs, long_specs)):
        if _task(spec) != _task(long_spec):
            raise UserError(f"prompt {index} (line {index + 1}) of '{long_prompts_path}' is not the task of the same line of "
                            f"'{metadata_path}' (tag/include/exclude differ); the files must be line-aligned")
    return lines, specs, [spec["prompt"] for spec in long_specs]


def prompt_folder(out_dir: str | Path, index: int) -> Path:
    return Path(out_dir) / f"{index:05d}"


def sample_path(out_dir: str | Path, index: int, sample: int) -> Path:
    return prompt_folder(out_dir, index) / SAMPLES_DIR / f"{sample:04d}.png"


# ----------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------
def _sampling_defaults(pipeline, steps, cfg, shift, size) -> tuple[Any, Any, Any, Any]:
    sampling = getattr(pipeline, "sampling", None)
    if sampling is not None:
        steps = steps or sampling.steps
        cfg = sampling.cfg if cfg is None else cfg
        shift = sampling.shift if shift is None else shift
    if size is None:
        image_tokenizer = getattr(pipeline, "image_tokenizer", None)
        size = getattr(getattr(image_tokenizer, "config", None), "image_size", None)
    return steps, cfg, shift, size


def generate_geneval(pipeline, metadata_path: str | Path, out_dir: str | Path, images_per_prompt: int = 4,
                     long_prompts_path: str | Path | None = None, steps: int | None = None, cfg: float | None = None,
                     shift: float | None = None, seed: int = 0, batch_size: int = 8, size: int | None = None,
                     model_id: str | None = None, progress: bool = True) -> dict:
    """Generate ``images_per_prompt`` images per prompt into GenEval's layout; returns the protocol record.

    ``pipeline(prompts, steps=, cfg=, shift=, seed=[...], size=)`` must return one PIL image per prompt (a
    `UnimmPipeline` does). Defaults for steps / cfg / shift / size are the pipeline's own and are recorded
    resolved. Images already on disk are skipped; an out folder written with other settings is refused."""
    from tqdm import tqdm

    from eval.results import file_sha256
    from unimm.atomic import atomic_write, atomic_write_text

    if images_per_prompt < 1 or batch_size < 1:
        raise UserError(f"images per prompt and batch size must be at least 1 (got {images_per_prompt}, {batch_size})")
    lines, specs, prompts = read_prompts(metadata_path, long_prompts_path)
    steps, cfg, shift, size = _sampling_defaults(pipeline, steps, cfg, shift, size)
    out_dir = Path(out_dir)
    record = {
        "benchmark": "GenEval",
        "layout": "<out>/<index:05d>/metadata.jsonl (the original metadata line) + samples/<k:04d>.png",
        "metadata_file": str(metadata_path),
        "metadata_sha256": file_sha256(metadata_path),
        "prompt_source": "long prompts (line-aligned rewrite)" if long_prompts_path else "original prompts",
        "long_prompts_file": str(long_prompts_path) if long_prompts_path else None,
        "long_prompts_sha256": file_sha256(long_prompts_path) if long_prompts_path else None,
        "num_prompts": len(specs),
        "tags": [spec["tag"] for spec in specs],
        "images_per_prompt": images_per_prompt,
        "seed": seed,
        "seeds": "image k of every prompt uses seed + k",
        "steps": steps,
        "cfg": cfg,
        "shift": shift,
        "resolution": size,
        "model": model_id,
        "generator": f"{type(pipeline).__module__}.{type(pipeline).__name__}",
    }
    record_path = out_dir / GENERATION_FILE
    if record_path.is_file():
        try:
            previous = json.loads(record_path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{record_path} is not JSON; remove it or choose another output folder") from None
        changed = [key for key in PROTOCOL_KEYS if previous.get(key) != record[key]]
        if changed:
            raise UserError(f"'{out_dir}' was generated with other settings ({', '.join(f'{key}: {previous.get(key)!r} -> {record[key]!r}' for key in changed)}); "
                            "use another output folder (-o) or the same settings")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record_path, json.dumps({**record, "complete": False}, indent=1) + "\n")

    jobs: list[tuple[int, int]] = []
    for index, line in enumerate(lines):
        metadata_file = prompt_folder(out_dir, index) / METADATA_FILE
        if metadata_file.is_file():
            if metadata_file.read_text(encoding="utf-8").strip() != line:
                raise UserError(f"{metadata_file} holds another prompt than line {index + 1} of '{metadata_path}'; "
                                "use another output folder (-o) for another prompt file")
        else:
            atomic_write_text(metadata_file, line + "\n")
        (prompt_folder(out_dir, index) / SAMPLES_DIR).mkdir(exist_ok=True)
        jobs += [(index, sample) for sample in range(images_per_prompt) if not sample_path(out_dir, index, sample).is_file()]
    skipped = len(specs) * images_per_prompt - len(jobs)
    if skipped and progress:
        print(f"geneval: {skipped} of {len(specs) * images_per_prompt} images already in {out_dir}, generating {len(jobs)}", file=sys.stderr)

    with tqdm(total=len(jobs), desc="geneval generate", unit="image", disable=not progress) as bar:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            images = pipeline([prompts[index] for index, _ in chunk], steps=steps, cfg=cfg, shift=shift,
                              seed=[seed + sample for _, sample in chunk], size=size)
            if len(images) != len(chunk):
                raise RuntimeError(f"the pipeline returned {len(images)} images for {len(chunk)} prompts")
            for (index, sample), image in zip(chunk, images):
                atomic_write(sample_path(out_dir, index, sample), lambda path, image=image: image.save(path, format="PNG"))
                if record["resolution"] is None:
                    record["resolution"] = image.width if image.width == image.height else [image.width, image.height]
            bar.update(len(chunk))

    record.update(generated_images=len(jobs), skipped_images=skipped, complete=True)
    atomic_write_text(record_path, json.dumps(record, indent=1) + "\n")
    return record


# ----------------------------------------------------------------------------------------------------
# Detections and GenEval's detection-side rules
# ----------------------------------------------------------------------------------------------------
@dataclass
class DetectedObject:
    """One instance from a detector: GenEval class name, box (x1, y1, x2, y2) in pixels, score, (H, W) bool mask."""

    class_name: str
    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = None


def select_detections(objects: Sequence[DetectedObject], tag: str, threshold: float = THRESHOLD,
                      counting_threshold: float = COUNTING_THRESHOLD, max_objects: int = MAX_OBJECTS) -> dict[str, list[DetectedObject]]:
    """GenEval's selection: per class, the objects scoring above the threshold (``counting_threshold`` for
    counting prompts), most confident first, at most ``max_objects``; no NMS (GenEval's max_overlap = 1)."""
    limit = counting_threshold if tag == "counting" else threshold
    selected: dict[str, list[DetectedObject]] = {}
    for candidate in sorted(objects, key=lambda candidate: -candidate.score):
        if candidate.score > limit:
            kept = selected.setdefault(candidate.class_name, [])
            if len(kept) < max_objects:
                kept.append(candidate)
    return selected


def color_crop(image: Image.Image, box: Sequence[float], mask: np.ndarray | None, background: str = CROP_BACKGROUND) -> Image.Image:
    """What GenEval shows CLIP: the object's mask composited onto a grey background, cropped to its box."""
    image = image.convert("RGB")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != (image.height, image.width):
            raise ValueError(f"mask {mask.shape} does not match the image ({image.height}, {image.width})")
        blank = Image.new("RGB", image.size, color=background)
        image = Image.composite(image, blank, Image.fromarray(mask.astype(bool).astype(np.uint8) * 255, mode="L"))
    x1, y1, x2, y2 = (float(value) for value in box[:4])
    return image.crop((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)))


def geneval_label_map(id2label: dict) -> tuple[dict[int, str], str, list[str]]:
    """Detector label id -> GenEval class name, how it was mapped, and the labels that have no GenEval name.

    Names are matched case-insensitively (``_``/``-`` as spaces) with COCO's alternative spellings
    (``mouse`` -> ``computer mouse`` ...). A model whose 80 labels carry no known name (``LABEL_0`` ...) is
    taken to be in COCO's order, which GenEval's object_names.txt follows."""
    known = set(GENEVAL_OBJECTS)
    mapping, unmapped = {}, []
    for label_id, name in sorted(((int(key), str(value)) for key, value in id2label.items())):
        canonical = " ".join(name.lower().replace("_", " ").replace("-", " ").split())
        canonical = LABEL_ALIASES.get(canonical, LABEL_ALIASES.get(canonical.replace(" ", ""), canonical))
        if canonical in known:
            mapping[label_id] = canonical
        else:
            unmapped.append(name)
    if not mapping and len(id2label) == len(GENEVAL_OBJECTS):
        return dict(enumerate(GENEVAL_OBJECTS)), "COCO index order (the label names are not COCO names)", []
    return mapping, "by name", unmapped


def _mask_boxes(masks) -> list[tuple[float, float, float, float]]:
    """mmdet's mask2bbox: (x_min, y_min, x_max + 1, y_max + 1) of each mask's pixels."""
    boxes = []
    rows_any, cols_any = masks.any(dim=2), masks.any(dim=1)
    for rows, cols in zip(rows_any, cols_any):
        ys, xs = rows.nonzero().flatten(), cols.nonzero().flatten()
        boxes.append((float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)))
    return boxes


def _loading_error(what: str, name: str, error: BaseException) -> UserError:
    text = " ".join(str(error).split())[:300]
    where = "directory" if Path(name).expanduser().exists() else "directory or hub id (not reachable offline?)"
    return UserError(f"cannot load the {what} from {where} '{name}' ({error.__class__.__name__}: {text})")


def _source(name_or_path: str) -> str:
    """A local directory (``~`` expanded) or, when nothing exists at that path, a hub id."""
    path = Path(name_or_path).expanduser()
    return str(path) if path.exists() else str(name_or_path)


def _device(device):
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Mask2FormerDetector:
    """COCO instance segmentation with a ``transformers`` Mask2Former, post-processed like mmdet's Mask2Former
    (the detector of the official evaluator): the top ``max_per_image`` (query, class) pairs, score = class
    probability x mean mask probability inside the mask, masks upsampled bilinearly to the padded input, cropped
    to the image, upsampled to the original size and thresholded at 0.5, boxes = mask extents."""

    def __init__(self, model, processor, name: str = "", max_per_image: int = 100, chunk_size: int = 20):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.name = name
        self.max_per_image = max_per_image
        self.chunk_size = chunk_size
        self.labels, self.label_mapping, self.unmapped_labels = geneval_label_map(model.config.id2label)

    @classmethod
    def from_pretrained(cls, name_or_path: str, device=None) -> Mask2FormerDetector:
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        source = _source(name_or_path)
        try:
            model = Mask2FormerForUniversalSegmentation.from_pretrained(source)
            processor = AutoImageProcessor.from_pretrained(source)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            raise _loading_error("Mask2Former detector", name_or_path, error) from None
        return cls(model.to(_device(device)), processor, name=str(name_or_path))

    @property
    def judge(self) -> dict:
        return {
            "name": self.name,
            "model": f"transformers {type(self.model).__name__} ({self.model.config.num_labels} labels)",
            "label_mapping": self.label_mapping,
            "labels_without_geneval_class": len(self.unmapped_labels),
            "geneval_classes_not_detectable": [name for name in GENEVAL_OBJECTS if name not in set(self.labels.values())],
            "post_processing": "mmdet Mask2Former instance: top-k (query, class) pairs, class prob x mask score, mask > 0.5 at the original size, box = mask extent",
            "max_per_image": self.max_per_image,
        }

    def detect(self, images: Sequence[Image.Image]) -> list[list[DetectedObject]]:
        """All instances of every image (unthresholded; :func:`select_detections` applies GenEval's rules)."""
        import torch

        device = next(self.model.parameters()).device
        images = [image.convert("RGB") for image in images]
        inputs = self.processor(images=images, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(device)
        pixel_mask = inputs.get("pixel_mask")
        with torch.no_grad():
            outputs = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask.to(device) if pixel_mask is not None else None)
            results = []
            for index, image in enumerate(images):
                if pixel_mask is not None:
                    valid = pixel_mask[index].bool()
                    valid_size = (int(valid.any(dim=1).sum()), int(valid.any(dim=0).sum()))
                else:
                    valid_size = tuple(pixel_values.shape[-2:])
                results.append(self._instances(outputs.class_queries_logits[index], outputs.masks_queries_logits[index],
                                               tuple(pixel_values.shape[-2:]), valid_size, (image.height, image.width)))
        return results

    def _instances(self, class_logits, mask_logits, input_size, valid_size, image_size) -> list[DetectedObject]:
        import torch.nn.functional as F

        probabilities = class_logits.float().softmax(-1)[:, :-1]
        num_queries, num_classes = probabilities.shape
        scores, flat = probabilities.flatten().topk(min(self.max_per_image, probabilities.numel()))
        queries, labels = flat // num_classes, flat % num_classes
        objects = []
        for start in range(0, len(flat), self.chunk_size):
            part = slice(start, start + self.chunk_size)
            keep = [i for i, label in enumerate(labels[part].tolist()) if label in self.labels]
            if not keep:
                continue
            chosen = queries[part][keep]
            masks = F.interpolate(mask_logits[chosen][None].float(), size=input_size, mode="bilinear", align_corners=False)[0]
            masks = masks[:, :valid_size[0], :valid_size[1]]
            masks = F.interpolate(masks[None], size=image_size, mode="bilinear", align_corners=False)[0]
            binary = masks > 0
            mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
            nonempty = binary.flatten(1).any(1)
            boxes_at = [i for i in range(len(keep)) if bool(nonempty[i])]
            if not boxes_at:
                continue
            boxes = _mask_boxes(binary[boxes_at])
            for position, box in zip(boxes_at, boxes):
                entry = start + keep[position]
                objects.append(DetectedObject(self.labels[int(labels[entry])], box, float(scores[entry] * mask_scores[position]),
                                              binary[position].cpu().numpy()))
        return objects


class ClipColorClassifier:
    """GenEval's colour rule: zero-shot CLIP over its 10 colours, one classifier per object class built from its
    three templates (each text embedding normalised, averaged, normalised again); the image is the object's
    mask composited onto grey and cropped to its box (:func:`color_crop`)."""

    def __init__(self, model, processor, name: str = "", colors: Sequence[str] = GENEVAL_COLORS,
                 templates: Sequence[str] = COLOR_TEMPLATES, background: str = CROP_BACKGROUND, batch_size: int = 16):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.name = name
        self.colors = tuple(colors)
        self.templates = tuple(templates)
        self.background = background
        self.batch_size = batch_size
        self._classifiers: dict[str, Any] = {}

    @classmethod
    def from_pretrained(cls, name_or_path: str, device=None) -> ClipColorClassifier:
        from transformers import CLIPModel, CLIPProcessor

        source = _source(name_or_path)
        try:
            model = CLIPModel.from_pretrained(source)
            processor = CLIPProcessor.from_pretrained(source)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            raise _loading_error("CLIP model", name_or_path, error) from None
        return cls(model.to(_device(device)), processor, name=str(name_or_path))

    @property
    def judge(self) -> dict:
        return {"name": self.name, "model": f"transformers {type(self.model).__name__}", "colors": list(self.colors),
                "templates": list(self.templates), "crop": f"mask composited onto {self.background}, cropped to the box"}

    @staticmethod
    def _features(output):
        features = output if hasattr(output, "norm") else output.pooler_output
        return features / features.norm(dim=-1, keepdim=True)

    def _classifier(self, class_name: str):
        import torch

        if class_name not in self._classifiers:
            device = next(self.model.parameters()).device
            texts = [template.format(color=color, object=class_name) for color in self.colors for template in self.templates]
            tokens = self.processor.tokenizer(texts, padding=True, return_tensors="pt").to(device)
            with torch.no_grad():
                embeddings = self._features(self.model.get_text_features(**tokens)).reshape(len(self.colors), len(self.templates), -1)
            embeddings = embeddings.mean(dim=1)
            self._classifiers[class_name] = (embeddings / embeddings.norm(dim=-1, keepdim=True)).T
        return self._classifiers[class_name]

    def classify(self, image: Image.Image, objects: Sequence[DetectedObject], class_name: str) -> list[str]:
        """The colour name of each object (of GenEval class ``class_name``) in ``image``."""
        import torch

        if not objects:
            return []
        classifier = self._classifier(class_name)
        device = classifier.device
        crops = [color_crop(image, obj.box, obj.mask, self.background) for obj in objects]
        colors = []
        for start in range(0, len(crops), self.batch_size):
            pixels = self.processor.image_processor(images=crops[start:start + self.batch_size], return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                features = self._features(self.model.get_image_features(pixel_values=pixels.to(device)))
            colors += [self.colors[int(index)] for index in (features @ classifier).argmax(dim=1)]
        return colors


# ----------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------
def score_image(image: Image.Image, spec: dict, objects: Sequence[DetectedObject], color_classifier=None,
                threshold: float = THRESHOLD, counting_threshold: float = COUNTING_THRESHOLD,
                max_objects: int = MAX_OBJECTS) -> tuple[bool, list[str], dict[str, list[Detection]]]:
    """GenEval's verdict on one image from its detector output: (correct, reasons, the detections used)."""
    selected = select_detections(objects, spec["tag"], threshold, counting_threshold, max_objects)
    color_counts: dict[str, int] = {}
    for requirement in spec.get("include", []):
        if "color" in requirement:
            color_counts[requirement["class"]] = max(color_counts.get(requirement["class"], 0), int(requirement["count"]))
    detections: dict[str, list[Detection]] = {}
    for class_name, found in selected.items():
        colors: list[str | None] = [None] * len(found)
        count = color_counts.get(class_name, 0)
        if count and len(found) >= count:
            if color_classifier is None:
                raise ValueError("a colour prompt needs a colour classifier")
            colors[:count] = color_classifier.classify(image, found[:count], class_name)
        detections[class_name] = [Detection(tuple(obj.box), color, obj.score) for obj, color in zip(found, colors)]
    correct, reasons = evaluate_spec(detections, spec)
    return correct, reasons, detections


def read_geneval_folder(folder: str | Path) -> list[tuple[int, str, dict, list[Path]]]:
    """(index, metadata text, metadata, sample paths) of every prompt folder, read as the official evaluator
    does: numeric subfolders, metadata.jsonl holding one JSON object, samples/ files matching ``\\d+\\.png``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"GenEval folder '{folder}' does not exist; write it with unimm eval geneval generate")
    entries = []
    for sub in sorted((path for path in folder.iterdir() if path.is_dir() and path.name.isdigit()), key=lambda path: int(path.name)):
        metadata_file = sub / METADATA_FILE
        if not metadata_file.is_file():
            raise UserError(f"{sub} has no {METADATA_FILE}; every prompt folder needs its metadata line")
        text = metadata_file.read_text(encoding="utf-8")
        try:
            metadata = json.loads(text)
        except json.JSONDecodeError:
            raise UserError(f"{metadata_file} is not one JSON object") from None
        if not isinstance(metadata, dict) or "tag" not in metadata or not isinstance(metadata.get("include"), list):
            raise UserError(f"{metadata_file} is not a GenEval prompt (needs 'tag' and an 'include' list)")
        samples_dir = sub / SAMPLES_DIR
        samples = sorted(path for path in samples_dir.iterdir() if path.is_file() and SAMPLE_PATTERN.match(path.name)) if samples_dir.is_dir() else []
        entries.append((int(sub.name), text, metadata, samples))
    if not entries:
        raise UserError(f"'{folder}' holds no GenEval prompt folders (00000/metadata.jsonl + samples/0000.png ...)")
    return entries


def _detection_details(detections: dict[str, list[Detection]]) -> dict[str, list]:
    return {name: [[*(round(float(value), 2) for value in detection.box), round(detection.score, 4), detection.color]
                   for detection in found] for name, found in detections.items()}


def evaluate_geneval_folder(folder: str | Path, detector, color_classifier, results_path: str | Path | None = None,
                            threshold: float = THRESHOLD, counting_threshold: float = COUNTING_THRESHOLD,
                            max_objects: int = MAX_OBJECTS, progress: bool = True) -> dict:
    """Score a folder in GenEval's layout with the unimm evaluator.

    ``detector.detect(images)`` returns the :class:`DetectedObject` s of each image, ``color_classifier.classify``
    the colour of each object (see :class:`Mask2FormerDetector`, :class:`ClipColorClassifier`). Every image
    counts: an unreadable image, or one that ``generation.json`` promises but that is missing, is scored as
    incorrect. Returns {"scores" (per tag and overall = mean of tag means), "counts", "protocol", "records",
    "table", "results_path"}; the results are written to ``results_path`` (default
    ``<folder>/geneval_unimm_results.json``)."""
    import hashlib

    from tqdm import tqdm

    from eval.results import markdown_table, write_results

    folder = Path(folder)
    entries = read_geneval_folder(folder)
    generation: dict = {}
    if (folder / GENERATION_FILE).is_file():
        try:
            generation = json.loads((folder / GENERATION_FILE).read_text())
        except json.JSONDecodeError:
            generation = {}
    expected_per_prompt = generation.get("images_per_prompt")
    records: list[dict] = []
    sizes: set[tuple[int, int]] = set()
    digest = hashlib.sha256()  # over the folders' metadata lines, one per line: the prompt file's own SHA-256 when it is all there
    for _, text, _, _ in entries:
        digest.update(text.strip().encode() + b"\n")

    total = sum(len(samples) for *_, samples in entries)
    with tqdm(total=total, desc="geneval score", unit="image", disable=not progress) as bar:
        for index, _, metadata, samples in entries:
            images, paths = [], []
            for path in samples:
                try:
                    with Image.open(path) as handle:
                        images.append(ImageOps.exif_transpose(handle).convert("RGB"))
                    paths.append(path)
                except (OSError, ValueError) as error:
                    records.append({"folder": f"{index:05d}", "image": path.name, "tag": metadata["tag"], "prompt": metadata.get("prompt"),
                                    "correct": False, "reason": f"unreadable image ({error.__class__.__name__})", "detections": {}})
            found = detector.detect(images) if images else []
            for path, image, objects in zip(paths, images, found):
                sizes.add(image.size)
                correct, reasons, detections = score_image(image, metadata, objects, color_classifier, threshold, counting_threshold, max_objects)
                records.append({"folder": f"{index:05d}", "image": path.name, "tag": metadata["tag"], "prompt": metadata.get("prompt"),
                                "correct": bool(correct), "reason": "\n".join(reasons), "detections": _detection_details(detections)})
            bar.update(len(samples))
            if expected_per_prompt:
                present = {path.name for path in samples}
                for sample in range(int(expected_per_prompt)):
                    if f"{sample:04d}.png" not in present:
                        records.append({"folder": f"{index:05d}", "image": f"{sample:04d}.png", "tag": metadata["tag"], "prompt": metadata.get("prompt"),
                                        "correct": False, "reason": "missing image", "detections": {}})
    present_indices = {index for index, *_ in entries}
    tags = generation.get("tags") or []
    for index in range(int(generation.get("num_prompts") or 0)):
        if index not in present_indices and index < len(tags):
            for sample in range(int(expected_per_prompt or 1)):
                records.append({"folder": f"{index:05d}", "image": f"{sample:04d}.png", "tag": tags[index], "prompt": None,
                                "correct": False, "reason": "missing prompt folder", "detections": {}})
    missing = sum(record["reason"] in ("missing image", "missing prompt folder") for record in records)
    unreadable = sum(record["reason"].startswith("unreadable") for record in records)
    if (missing or unreadable) and progress:
        print(f"geneval: {missing} missing and {unreadable} unreadable images are scored as incorrect", file=sys.stderr)

    scores = summarize(records)
    counts = {}
    for record in records:
        tag_counts = counts.setdefault(record["tag"], {"correct": 0, "images": 0})
        tag_counts["correct"] += int(record["correct"])
        tag_counts["images"] += 1
    official_rules = (threshold, counting_threshold, max_objects) == (THRESHOLD, COUNTING_THRESHOLD, MAX_OBJECTS)
    if len(sizes) == 1:
        width, height = next(iter(sizes))
        resolution: Any = width if width == height else [width, height]
    else:
        resolution = [list(size) for size in sorted(sizes)]
    protocol = {
        "benchmark": "GenEval",
        "evaluator": EVALUATOR_NAME,
        "note": OFFICIAL_NOTE,
        "judge": {"detector": getattr(detector, "judge", type(detector).__name__),
                  "color_classifier": getattr(color_classifier, "judge", type(color_classifier).__name__)},
        "rules": {
            "threshold": threshold, "counting_threshold": counting_threshold, "max_objects_per_class": max_objects,
            "nms": "none (GenEval's max_overlap = 1)", "position_margin": POSITION_THRESHOLD,
            "colors": list(GENEVAL_COLORS), "color_templates": list(COLOR_TEMPLATES),
            "include": "AND", "exclude": "OR", "score": "mean over tags of each tag's image accuracy",
        },
        "official_rule_settings": official_rules,
        "folder": str(folder),
        "folder_metadata_sha256": digest.hexdigest(),
        "metadata_sha256": generation.get("metadata_sha256"),
        "prompt_source": generation.get("prompt_source"),
        "long_prompts_sha256": generation.get("long_prompts_sha256"),
        "resolution": resolution,
        "steps": generation.get("steps"),
        "cfg": generation.get("cfg"),
        "shift": generation.get("shift"),
        "seed": generation.get("seed"),
        "seeds": generation.get("seeds"),
        "images_per_prompt": expected_per_prompt,
        "model": generation.get("model"),
        "num_prompts": len(entries),
        "num_images": len(records),
        "missing_images": missing,
        "unreadable_images": unreadable,
    }
    ordered = [tag for tag in GENEVAL_TAGS if tag in counts] + sorted(tag for tag in counts if tag not in GENEVAL_TAGS)
    rows = [[tag, counts[tag]["correct"], counts[tag]["images"], scores[tag]] for tag in ordered]
    rows.append(["**overall** (mean of tags)", sum(c["correct"] for c in counts.values()), len(records), scores["overall"]])
    table = f"{EVALUATOR_NAME}\n\n" + markdown_table(["task", "correct", "images", "accuracy"], rows) + f"\n\n{OFFICIAL_NOTE}"
    path = Path(results_path) if results_path is not None else folder / "geneval_unimm_results.json"
    write_results(path, {"evaluator": EVALUATOR_NAME, **scores}, protocol, details={"counts": counts, "images": records})
    return {"scores": scores, "counts": counts, "protocol": protocol, "records": records, "table": table, "results_path": str(path)}
