"""Visual-question judges: one interface, a local ``transformers`` VLM and an OpenAI-compatible HTTP server.

A judge answers a text prompt about one or more images with free text::

    judge.ask(image, "Is there a cat? Please answer yes or no.")          -> "Yes."
    judge.ask([source, edited], viescore_prompt, max_new_tokens=512)       -> '{"score": [8, 9], ...}'
    judge.ask_many([(image, q1), (image, q2)], max_new_tokens=8)           -> ["yes", "no"]

Benchmarks turn answers into numbers themselves (``parse_yes_no`` here for DPG-Bench; the VIEScore parser in
``eval.gedit``). A judge that cannot produce an answer (network down, server error after its retries) raises
``JudgeError``; the harnesses count that as a failure, they never substitute a guess.

``describe()`` returns what a result file records about the judge (kind, model, decoding settings), so two
numbers are compared only when their judges match.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from unimm.errors import UserError

ImageInput = Image.Image | Sequence[Image.Image]
Request = tuple[ImageInput, str]

DEFAULT_MAX_NEW_TOKENS = 64


class JudgeError(RuntimeError):
    """The judge produced no answer (transport or server failure after retries)."""


@runtime_checkable
class VQAJudge(Protocol):
    """What the harnesses need from a judge."""

    def ask(self, images: ImageInput, prompt: str, max_new_tokens: int | None = None) -> str: ...

    def ask_many(self, requests: Sequence[Request], max_new_tokens: int | None = None) -> list[str | JudgeError]: ...

    def describe(self) -> dict[str, Any]: ...


def as_image_list(images: ImageInput) -> list[Image.Image]:
    items = [images] if isinstance(images, Image.Image) else list(images)
    if not items or not all(isinstance(item, Image.Image) for item in items):
        raise TypeError("a judge request takes one PIL image or a non-empty sequence of PIL images")
    return [item.convert("RGB") for item in items]


_YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


def parse_yes_no(answer: str | None) -> bool | None:
    """``True`` for an answer that starts with "yes", ``False`` for "no", ``None`` otherwise (unparseable).

    Leading punctuation/whitespace and case are ignored ("Yes.", " no, there is not" parse); an answer that
    does not start with yes or no (e.g. "There is a cat") is unparseable rather than guessed."""
    if not answer:
        return None
    match = _YES_NO.match(answer)
    return None if match is None else match.group(1).lower() == "yes"


def ask_yes_no(judge: VQAJudge, images: ImageInput, question: str, suffix: str = " Please answer yes or no.",
               max_new_tokens: int = 16) -> tuple[bool | None, str | None]:
    """(parsed answer, raw answer) for one yes/no question; a judge failure gives (None, None)."""
    try:
        answer = judge.ask(images, question + suffix, max_new_tokens)
    except JudgeError:
        return None, None
    return parse_yes_no(answer), answer


class SequentialAskMany:
    """Mixin for simple judges: ``ask_many`` by repeated ``ask``; a failed request yields its ``JudgeError``
    in place of the answer."""

    def ask_many(self, requests: Sequence[Request], max_new_tokens: int | None = None) -> list[str | JudgeError]:
        answers: list[str | JudgeError] = []
        for images, prompt in requests:
            try:
                answers.append(self.ask(images, prompt, max_new_tokens))  # type: ignore[attr-defined]
            except JudgeError as error:
                answers.append(error)
        return answers


# ----------------------------------------------------------------------------------------------------
# transformers
# ----------------------------------------------------------------------------------------------------
def _dtype_keyword() -> str:
    import transformers

    return "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def resolve_dtype(dtype: str | None, device):
    import torch

    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    try:
        value = getattr(torch, dtype)
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype):
        raise UserError(f"dtype '{dtype}' is not a torch dtype; use auto, float32, bfloat16 or float16")
    return value


def resolve_device(device: str | None):
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"'{device}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} asked for a GPU but CUDA is not available; use cpu")
    return resolved


def local_or_hub(name: str) -> tuple[str, bool]:
    """(path or hub id, is_local). A name that looks like a path must exist."""
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise UserError(f"model directory '{name}' does not exist; pass a save_pretrained directory or a hub id")
    return (str(path) if looks_local else name), looks_local


def config_fingerprint(directory: str | Path) -> str | None:
    """SHA-256 of a local model's config.json (identifies a local judge without hashing its weights)."""
    path = Path(directory) / "config.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


class TransformersVLMJudge:
    """A local vision-language model answering with greedy decoding (e.g. Qwen2.5-VL-7B/72B-Instruct).

    ``model`` is a ``save_pretrained`` directory or a hub id. Qwen2.5-VL checkpoints load through
    ``Qwen2_5_VLForConditionalGeneration``; other image-text-to-text models through
    ``AutoModelForImageTextToText``. Prompts go through the processor's chat template as one user turn:
    the images first, then the text (the layout VIEScore's Qwen2.5-VL backbone uses). Requests are batched
    ``batch_size`` at a time with left padding."""

    def __init__(self, model: str, device: str | None = None, dtype: str | None = None, batch_size: int = 8,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, attn_implementation: str | None = None):
        import torch
        from transformers import AutoConfig, AutoProcessor

        if batch_size < 1:
            raise UserError(f"judge batch size must be at least 1, got {batch_size}")
        self.name, self.local = local_or_hub(model)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        try:
            config = AutoConfig.from_pretrained(self.name)
            self.processor = AutoProcessor.from_pretrained(self.name)
        except (OSError, ValueError, KeyError) as error:
            where = "directory" if self.local else "hub id (not reachable offline?)"
            raise UserError(f"cannot load the judge from {where} '{model}' ({error.__class__.__name__}: {str(error)[:200]})") from None
        if config.model_type == "qwen2_5_vl":
            from transformers import Qwen2_5_VLForConditionalGeneration as model_class
        else:
            from transformers import AutoModelForImageTextToText as model_class
        kwargs: dict[str, Any] = {_dtype_keyword(): self.dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        self.model = model_class.from_pretrained(self.name, **kwargs).to(self.device).eval().requires_grad_(False)
        self.model_type = config.model_type
        self.commit = getattr(config, "_commit_hash", None)
        self.processor.tokenizer.padding_side = "left"
        self._torch = torch

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "transformers",
            "model": self.name,
            "model_type": self.model_type,
            "commit": self.commit,
            "config_sha256": config_fingerprint(self.name) if self.local else None,
            "dtype": str(self.dtype).removeprefix("torch."),
            "decoding": "greedy",
            "prompt_layout": "one user turn: images, then text; processor chat template with generation prompt",
        }

    def _messages(self, count: int, prompt: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image"} for _ in range(count)] + [{"type": "text", "text": prompt}]}]

    def ask(self, images: ImageInput, prompt: str, max_new_tokens: int | None = None) -> str:
        answer = self.ask_many([(images, prompt)], max_new_tokens)[0]
        if isinstance(answer, JudgeError):
            raise answer
        return answer

    def ask_many(self, requests: Sequence[Request], max_new_tokens: int | None = None) -> list[str | JudgeError]:
        answers: list[str | JudgeError] = []
        for start in range(0, len(requests), self.batch_size):
            answers.extend(self._generate(requests[start:start + self.batch_size], max_new_tokens or self.max_new_tokens))
        return answers

    def _generate(self, requests: Sequence[Request], max_new_tokens: int) -> list[str]:
        texts, images = [], []
        for request_images, prompt in requests:
            listed = as_image_list(request_images)
            texts.append(self.processor.apply_chat_template(self._messages(len(listed), prompt), tokenize=False, add_generation_prompt=True))
            images.extend(listed)
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt").to(self.device)
        with self._torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)]


# ----------------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP
# ----------------------------------------------------------------------------------------------------
RETRIED_HTTP_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


def image_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class OpenAICompatibleJudge:
    """A judge served behind an OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, vLLM, SGLang, ...).

    Images travel as base64 PNG data URLs, before the text in one user message. The API key is read from
    the environment variable ``api_key_env`` (never from the command line); local servers that need no key
    work with it unset. Transport errors, timeouts and HTTP 408/409/425/429/5xx are retried ``max_retries``
    times with exponential backoff (``backoff`` seconds, doubling); other HTTP errors fail at once. A request
    that still fails raises ``JudgeError``. ``workers`` requests of an ``ask_many`` run concurrently."""

    def __init__(self, model: str, base_url: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                 max_retries: int = 3, backoff: float = 2.0, temperature: float = 0.0,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, workers: int = 1):
        if not base_url.startswith(("http://", "https://")):
            raise UserError(f"judge URL '{base_url}' must start with http:// or https:// (e.g. http://localhost:8000/v1)")
        if workers < 1 or max_retries < 0 or timeout <= 0:
            raise UserError("judge workers must be >= 1, retries >= 0 and the timeout > 0")
        base = base_url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.workers = workers

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "openai-compatible",
            "model": self.model,
            "url": self.url,
            "api_key_env": self.api_key_env,
            "temperature": self.temperature,
            "decoding": "greedy" if self.temperature == 0 else f"temperature {self.temperature}",
            "max_retries": self.max_retries,
            "prompt_layout": "one user message: images (base64 PNG data URLs), then text",
        }

    def _payload(self, images: ImageInput, prompt: str, max_new_tokens: int) -> bytes:
        content: list[dict] = [{"type": "image_url", "image_url": {"url": image_data_url(image)}} for image in as_image_list(images)]
        content.append({"type": "text", "text": prompt})
        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                "temperature": self.temperature, "max_tokens": max_new_tokens}
        return json.dumps(body).encode("utf-8")

    def _post(self, payload: bytes) -> dict:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read().decode("utf-8"))

    def ask(self, images: ImageInput, prompt: str, max_new_tokens: int | None = None) -> str:
        payload = self._payload(images, prompt, max_new_tokens or self.max_new_tokens)
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                reply = self._post(payload)
            except urllib.error.HTTPError as error:
                last = f"HTTP {error.code}"
                if error.code not in RETRIED_HTTP_STATUS:
                    raise JudgeError(f"{self.url}: {last} (not retried)") from None
                continue
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError, OSError) as error:
                last = f"{error.__class__.__name__}: {getattr(error, 'reason', error)}"
                continue
            except json.JSONDecodeError:
                last = "reply is not JSON"
                continue
            try:
                content = reply["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                last = "reply has no choices[0].message.content"
                continue
            if isinstance(content, list):  # some servers return content parts
                content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
            return str(content or "").strip()
        raise JudgeError(f"{self.url}: no answer after {self.max_retries + 1} attempts ({last})")

    def ask_many(self, requests: Sequence[Request], max_new_tokens: int | None = None) -> list[str | JudgeError]:
        def one(request: Request) -> str | JudgeError:
            try:
                return self.ask(request[0], request[1], max_new_tokens)
            except JudgeError as error:
                return error

        if self.workers == 1 or len(requests) < 2:
            return [one(request) for request in requests]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(self.workers, len(requests))) as pool:
            return list(pool.map(one, requests))


# ----------------------------------------------------------------------------------------------------
# construction from command-line style arguments
# ----------------------------------------------------------------------------------------------------
def build_judge(kind: str, model: str, *, url: str | None = None, api_key_env: str = "OPENAI_API_KEY", device: str | None = None,
                dtype: str | None = None, batch_size: int = 8, timeout: float = 120.0, retries: int = 3, workers: int = 1,
                temperature: float = 0.0) -> VQAJudge:
    """``kind`` is ``transformers`` (``model`` = directory or hub id) or ``openai`` (``model`` = served model name,
    ``url`` = the server's base URL, e.g. http://localhost:8000/v1)."""
    if kind == "transformers":
        return TransformersVLMJudge(model, device=device, dtype=dtype, batch_size=batch_size)
    if kind == "openai":
        if not url:
            raise UserError("an openai judge needs --judge-url (the server's base URL, e.g. http://localhost:8000/v1)")
        return OpenAICompatibleJudge(model, url, api_key_env=api_key_env, timeout=timeout, max_retries=retries,
                                     workers=workers, temperature=temperature)
    raise UserError(f"unknown judge kind '{kind}'; use transformers or openai")
