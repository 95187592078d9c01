"""DPG-Bench, GEdit-Bench (VIEScore) and EditReward harnesses.

Scoring rules on hand-made answers with known results (DPG dependency cascade, VIEScore parsing and
aggregation); the OpenAI-compatible judge against a local ``http.server`` stub; every harness end to end
through ``unimm eval`` with a tiny pipeline and tiny judges built from the real ``transformers`` classes
(a Qwen2.5-VL written with ``save_pretrained`` and loaded back, with a tokenizer/processor made here; no
network).
"""

from __future__ import annotations

import csv
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image

from eval.dpg import (
    DPGItem,
    DPGQuestion,
    apply_dependencies,
    make_grid,
    read_questions,
    score_answers,
    score_dpg,
    split_grid,
)
from eval.gedit import aggregate, parse_viescore, read_gedit, viescore
from eval.judges import JudgeError, OpenAICompatibleJudge, SequentialAskMany, ask_yes_no, parse_yes_no
from eval.results import file_sha256
from unimm.cli import main

# ----------------------------------------------------------------------------------------------------
# tiny models
# ----------------------------------------------------------------------------------------------------
VLM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
VLM_WORDS = ["yes", "no", "score", "reasoning", "user", "assistant"]  # "yes" is token 0
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PIXELS = 56 * 56  # every image becomes 56 x 56: 4 x 4 patches of 14 px, 4 tokens after the 2 x 2 merge


def tiny_qwen_vl_processor():
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    vocab: dict[str, int] = {}
    for token in VLM_WORDS + list(string.ascii_letters + string.digits + string.punctuation + " \n") + VLM_SPECIALS:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("|".join(VLM_WORDS) + r"|\s|."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(VLM_SPECIALS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)
    image_processor = Qwen2VLImageProcessor(min_pixels=PIXELS, max_pixels=PIXELS)
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                               chat_template=CHAT_TEMPLATE)


def tiny_qwen_vl_config(tokenizer, vocab_size: int | None = None):
    from transformers import Qwen2_5_VLConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in VLM_SPECIALS}
    text = dict(vocab_size=vocab_size or len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=1024, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, fullatt_block_indexes=[0])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def write_tiny_qwen_vl(directory: Path, always_yes: bool = False) -> Path:
    """A random Qwen2.5-VL judge; ``always_yes`` zeroes the final norm so every logit is 0 and greedy decoding
    picks token 0 ("yes") -- a judge with a known answer, still run through the real generate()."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = tiny_qwen_vl_processor()
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen_vl_config(processor.tokenizer)).eval()
    if always_yes:
        with torch.no_grad():
            model.model.language_model.norm.weight.zero_()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {"random": write_tiny_qwen_vl(root / "random"), "yes": write_tiny_qwen_vl(root / "yes", always_yes=True)}


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory, encoders):
    """An untrained unimm pipeline (32 px, real classes) saved with save_pretrained."""
    from tests.generator_fixtures import tiny_generator_config, write_tiny_text_model, write_tiny_tokenizer
    from unimm.models.backbone import load_text_tokenizer
    from unimm.models.generator import UnimmGenerator
    from unimm.pipeline import UnimmPipeline
    from unimm.trainer import load_frozen_tokenizer

    root = tmp_path_factory.mktemp("pipeline")
    tokenizer = write_tiny_tokenizer(encoders, root / "unused-data", root)
    text_model = write_tiny_text_model(root / "text-model")
    config = tiny_generator_config(tokenizer, text_model, "unused", root / "run")
    image_tokenizer = load_frozen_tokenizer(str(tokenizer))
    config.model.latent_channels = image_tokenizer.latent_shape[0]
    torch.manual_seed(0)
    generator = UnimmGenerator.build(config.model).eval()
    pipeline = UnimmPipeline(generator, load_text_tokenizer(str(text_model)), image_tokenizer, config.sampling, config.model.backbone.max_text_tokens)
    return pipeline.save_pretrained(root / "pipeline")


# ----------------------------------------------------------------------------------------------------
# an OpenAI-compatible stub server
# ----------------------------------------------------------------------------------------------------
class StubState:
    def __init__(self, respond):
        self.respond = respond  # (request json) -> (status, text reply) ; may sleep
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()


@pytest.fixture
def stub_server():
    servers = []

    def start(respond):
        state = StubState(respond)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with state.lock:
                    state.requests.append(body)
                    state.headers.append(dict(self.headers))
                status, text = state.respond(body)
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]} if status == 200 else {"error": text})
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(payload.encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1", state

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _prompt_text(body: dict) -> str:
    return "".join(part.get("text", "") for part in body["messages"][0]["content"] if part["type"] == "text")


# ----------------------------------------------------------------------------------------------------
# judges
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("answer", "expected"), [
    ("yes", True), ("Yes.", True), (" YES, there is a cat", True), ("no", False), ("No, none.", False),
    ("**No**", False), ("yesterday", None), ("There is a cat", None), ("", None), (None, None), ("maybe", None),
])
def test_parse_yes_no(answer, expected):
    assert parse_yes_no(answer) is expected


def test_openai_judge_sends_images_and_key_and_retries(stub_server, monkeypatch):
    calls = {"n": 0}

    def respond(body):
        calls["n"] += 1
        return (500, "overloaded") if calls["n"] == 1 else (200, "Yes.")

    url, state = stub_server(respond)
    monkeypatch.setenv("UNIMM_TEST_KEY", "sk-test")
    judge = OpenAICompatibleJudge("stub-vlm", url, api_key_env="UNIMM_TEST_KEY", backoff=0.0, max_retries=2)
    red, blue = Image.new("RGB", (8, 6), "red"), Image.new("RGB", (5, 5), "blue")
    assert judge.ask([red, blue], "Is it red?") == "Yes."
    assert len(state.requests) == 2  # the 500 was retried
    body = state.requests[-1]
    assert body["model"] == "stub-vlm" and body["temperature"] == 0.0
    parts = body["messages"][0]["content"]
    assert [part["type"] for part in parts] == ["image_url", "image_url", "text"] and parts[-1]["text"] == "Is it red?"
    assert all(part["image_url"]["url"].startswith("data:image/png;base64,") for part in parts[:2])
    assert state.headers[-1]["Authorization"] == "Bearer sk-test"
    assert judge.describe()["api_key_env"] == "UNIMM_TEST_KEY" and "sk-test" not in json.dumps(judge.describe())


def test_openai_judge_failures_become_judge_errors(stub_server):
    url, state = stub_server(lambda body: (400, "bad request") if "bad" in _prompt_text(body) else (503, "down"))
    judge = OpenAICompatibleJudge("stub", url, backoff=0.0, max_retries=2, workers=2)
    with pytest.raises(JudgeError, match="HTTP 400"):
        judge.ask(Image.new("RGB", (4, 4)), "bad")
    assert len(state.requests) == 1  # a 400 is not retried
    answers = judge.ask_many([(Image.new("RGB", (4, 4)), "a"), (Image.new("RGB", (4, 4)), "bad")])
    assert all(isinstance(answer, JudgeError) for answer in answers)
    assert len(state.requests) == 1 + 3 + 1  # 503: first try + 2 retries


def test_openai_judge_times_out(stub_server):
    import time

    url, state = stub_server(lambda body: (time.sleep(0.6), (200, "yes"))[1])
    judge = OpenAICompatibleJudge("stub", url, timeout=0.2, backoff=0.0, max_retries=1)
    with pytest.raises(JudgeError, match="2 attempts"):
        judge.ask(Image.new("RGB", (4, 4)), "slow?")


def test_transformers_judge_answers_with_the_real_generate(vlms):
    from eval.judges import TransformersVLMJudge

    judge = TransformersVLMJudge(str(vlms["yes"]), device="cpu", batch_size=2)
    one, two = Image.new("RGB", (40, 30), "red"), Image.new("RGB", (20, 50), "green")
    assert judge.ask(one, "Is there a circle?", max_new_tokens=1) == "yes"
    assert ask_yes_no(judge, one, "Is there a circle?", max_new_tokens=1) == (True, "yes")
    assert judge.ask_many([(one, "a?"), ([one, two], "b?"), (two, "a much longer question?")], max_new_tokens=1) == ["yes"] * 3
    assert judge.describe()["kind"] == "transformers" and judge.describe()["config_sha256"]
    random_judge = TransformersVLMJudge(str(vlms["random"]), device="cpu")
    first = random_judge.ask([one, two], "Score it.", max_new_tokens=6)
    assert first == random_judge.ask([one, two], "Score it.", max_new_tokens=6)  # greedy: deterministic


# ----------------------------------------------------------------------------------------------------
# DPG-Bench rules
# ----------------------------------------------------------------------------------------------------
def _questions(*specs) -> list[DPGQuestion]:
    return [DPGQuestion(pid, f"q{pid}?", tuple(parents), category) for pid, parents, category in specs]


def test_dependency_rule_cascades_in_file_order():
    questions = _questions((1, (), "entity - whole"), (2, (1,), "attribute - color"), (3, (2,), "attribute - texture"),
                           (4, (1,), "other - count"), (5, (), "entity - whole"), (6, (5, 4), "relation - spatial"))
    raw = {1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0, 6: 1.0}
    # 1 fails -> 2, 4 fail -> 3 (child of 2) and 6 (child of 4) fail: the cascade runs down the chain.
    assert apply_dependencies(raw, questions) == {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0, 5: 1.0, 6: 0.0}
    item = DPGItem("x", "", questions)
    score, raw_scores, final = score_answers(item, {1: False, 2: True, 3: True, 4: True, 5: True, 6: True})
    assert score == pytest.approx(1 / 6) and raw_scores == raw
    # unparsed / failed answers (None) score 0 and zero their children too
    assert score_answers(item, {1: True, 2: None, 3: True, 4: True, 5: True, 6: True})[0] == pytest.approx(4 / 6)
    # The official loop reads the scores it is zeroing in file order: a question listed before its parent's parent
    # sees its parent's raw score.
    backwards = _questions((1, (2,), "a - b"), (2, (3,), "a - b"), (3, (), "a - b"))
    assert apply_dependencies({1: 1.0, 2: 1.0, 3: 0.0}, backwards) == {1: 1.0, 2: 0.0, 3: 0.0}


CSV_ROWS = [
    # item_id, text, proposition_id, dependency, tuple, question
    ("p1", "a red circle above a blue square", 1, "0", "entity - whole (circle)", "Is there a circle?"),
    ("p1", "a red circle above a blue square", 2, "1", "attribute - color (circle, red)", "Is the circle red?"),
    ("p1", "a red circle above a blue square", 3, "0", "entity - whole (square)", "Is there a square?"),
    ("p1", "a red circle above a blue square", 4, "1,3", "relation - spatial (circle, square, above)", "Is the circle above the square?"),
    ("p2", "two green triangles", 1, "0", "entity - whole (triangle)", "Is there a triangle?"),
    ("p2", "two green triangles", 2, "1", "other - count (triangle, ==2)", "Are there two triangles?"),
    ("p3", "a missing picture", 1, "0", "entity - whole (picture)", "Is there a picture?"),
]


def write_questions(path: Path, rows=CSV_ROWS) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["item_id", "text", "keywords", "proposition_id", "dependency", "category_broad",
                                                    "category_detailed", "tuple", "question_natural_language"])
        writer.writeheader()
        for item_id, text, pid, dependency, tuple_text, question in rows:
            broad, detailed = (part.strip() for part in tuple_text.split("(")[0].split("-"))
            writer.writerow({"item_id": item_id, "text": text, "keywords": "", "proposition_id": pid, "dependency": dependency,
                             "category_broad": broad, "category_detailed": detailed, "tuple": tuple_text, "question_natural_language": question})
    return path


def test_question_file_reader_and_its_errors(tmp_path):
    items = read_questions(write_questions(tmp_path / "q.csv"))
    assert [item.item_id for item in items] == ["p1", "p2", "p3"] and items[0].text.startswith("a red circle")
    assert items[0].questions[3] == DPGQuestion(4, "Is the circle above the square?", (1, 3), "relation - spatial")
    assert items[0].questions[0].dependencies == () and items[0].questions[1].category_broad == "attribute"
    bad_parent = [row if row[2] != 2 or row[0] != "p2" else (*row[:3], "7", *row[4:]) for row in CSV_ROWS]
    with pytest.raises(Exception, match="unknown proposition"):
        read_questions(write_questions(tmp_path / "bad.csv", bad_parent))
    with pytest.raises(Exception, match="integers"):
        read_questions(write_questions(tmp_path / "bad2.csv", [("p1", "t", 1, "x", "entity - whole (a)", "Is there a?")]))


def test_grid_round_trip():
    tiles = [Image.new("RGB", (8, 8), color) for color in ("red", "green", "blue", "white")]
    grid = make_grid(tiles)
    assert grid.size == (16, 16)
    assert [tile.getpixel((3, 3)) for tile in split_grid(grid)] == [(255, 0, 0), (0, 128, 0), (0, 0, 255), (255, 255, 255)]
    assert len(split_grid(grid, 8, tiles=1)) == 1
    with pytest.raises(ValueError):
        split_grid(grid, 9)


class ColourJudge(SequentialAskMany):
    """Says yes on red tiles, no elsewhere; 'Is the circle red?' gets an unparseable answer."""

    def __init__(self):
        self.asked = 0

    def ask(self, images, prompt, max_new_tokens=None):
        self.asked += 1
        if prompt.startswith("Is the circle red?"):
            return "It is crimson."
        return "Yes." if images.getpixel((1, 1)) == (255, 0, 0) else "No."

    def describe(self):
        return {"kind": "colour"}


def test_dpg_scoring_on_known_answers(tmp_path):
    items = read_questions(write_questions(tmp_path / "q.csv"))
    colours = {"p1": ("red", "red", "blue", "blue"), "p2": ("red", "white", "white", "white")}
    for item_id, tile_colours in colours.items():
        make_grid([Image.new("RGB", (8, 8), colour) for colour in tile_colours]).save(tmp_path / f"{item_id}.png")
    judge = ColourJudge()
    result = score_dpg(judge, items, tmp_path, progress=False)
    # p1: red tiles: q1 yes, q2 unparsed (0), q3 yes, q4 yes -> 3/4; blue tiles: all 0 (q2 unparsed) -> (3/4 * 2) / 4
    # p2: red tile: 2/2, white tiles: 0 -> 1/4;  p3: missing image -> 0 (kept in the denominator)
    p1, p2 = (0.75 * 2) / 4, 1 / 4
    assert result["scores"]["dpg_bench"] == pytest.approx(100 * (p1 + p2 + 0) / 3)
    assert result["scores"]["dpg_bench_scored_items_only"] == pytest.approx(100 * (p1 + p2) / 2)
    assert result["scores"]["items"] == 3 and result["scores"]["items_scored"] == 2
    failures = result["failures"]
    assert failures["missing_image"] == 1 and failures["failed_items"] == 1 and failures["unparsed_answers"] == 4
    assert failures["questions_asked"] == judge.asked == 4 * 4 + 4 * 2
    # categories average the answers before the dependency rule, over all tiles
    assert result["scores"]["l2"]["attribute - color"] == 0.0
    assert result["scores"]["l2"]["entity - whole"] == pytest.approx(100 * (2 + 2 + 1) / (8 + 4))
    assert result["scores"]["l1"]["relation"] == pytest.approx(100 * 2 / 4)
    assert [record["status"] for record in result["details"]] == ["ok", "ok", "missing_image"]


# ----------------------------------------------------------------------------------------------------
# VIEScore rules
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("answer", "expected"), [
    ('{\n"score" : [7, 9],\n"reasoning" : "fine"\n}', [7.0, 9.0]),
    ('||V^=^V||\n{"score": [3, 10], "reasoning": "x"}\n||V^=^V||', [3.0, 10.0]),
    ('```json\n{"score": [0, 5.5], "reasoning": "the hat is missing"}\n```', [0.0, 5.5]),
    ('{score: [4, 6], reasoning: unquoted}', [4.0, 6.0]),
    ('The scores are "score": [8, 2] because ...', [8.0, 2.0]),
    ('{"score": [7, 9, 3]}', None),
    ('{"score": [11, 2]}', None),
    ('{"score": [7, "high"]}', None),
    ('{"score": 7}', None),
    ("I cannot evaluate this image.", None),
    ("", None),
])
def test_viescore_answer_parsing(answer, expected):
    assert parse_viescore(answer) == expected


def test_viescore_aggregation_on_known_scores():
    assert viescore([4, 9], [9, 6]) == {"SC": 4, "PQ": 6, "O": pytest.approx(math.sqrt(24))}

    def record(task, language, sc, pq, intersection=True, status="ok"):
        return {"task_type": task, "language": language, "intersection_exist": intersection, "SC": sc, "PQ": pq,
                "O": math.sqrt(sc * pq), "status": status}

    records = [
        record("color_alter", "en", 4, 9), record("color_alter", "en", 9, 1, intersection=False),  # O: 6 and 3
        record("background_change", "en", 10, 10),
        record("background_change", "en", 0, 0, status="unparsed"),  # a failure: zeros, kept
        record("color_alter", "cn", 1, 4),
    ]
    result = aggregate(records)
    en = result["en"]["fullset"]
    assert list(en["tasks"]) == ["background_change", "color_alter"]  # the official task order
    assert en["tasks"]["color_alter"] == {"SC": 6.5, "PQ": 5.0, "O": 4.5, "n": 2, "failed": 0}  # mean of O, not sqrt of means
    assert en["tasks"]["background_change"] == {"SC": 5.0, "PQ": 5.0, "O": 5.0, "n": 2, "failed": 1}
    assert en["average"] == {"SC": pytest.approx(5.75), "PQ": pytest.approx(5.0), "O": pytest.approx(4.75)}  # plain mean over tasks
    assert result["en"]["intersection"]["tasks"]["color_alter"]["O"] == 6.0
    assert result["en"]["intersection"]["average"]["O"] == pytest.approx((6.0 + 5.0) / 2)
    assert result["cn"]["fullset"]["average"] == {"SC": 1.0, "PQ": 4.0, "O": 2.0}
    assert result["cn"]["intersection"]["average"]["O"] == 2.0


# ----------------------------------------------------------------------------------------------------
# GEdit-Bench data
# ----------------------------------------------------------------------------------------------------
GEDIT_ROWS = [  # key, task_type, language, instruction, intersection
    ("k1", "background_change", "en", "Make the background blue.", True),
    ("k2", "color_alter", "en", "Turn the square green.", False),
    ("k3", "style_change", "en", "garble: make it a watercolour.", True),
    ("k1", "background_change", "cn", "把背景变成蓝色。", True),
    ("k2", "color_alter", "cn", "把方块变成绿色。", False),
]


def gedit_dataset():
    import datasets

    colours = {"k1": "red", "k2": "yellow", "k3": "purple"}
    features = datasets.Features({
        "task_type": datasets.Value("string"), "key": datasets.Value("string"), "instruction": datasets.Value("string"),
        "instruction_language": datasets.Value("string"), "input_image": datasets.Image(), "input_image_raw": datasets.Image(),
        "Intersection_exist": datasets.Value("bool"),
    })
    columns = {name: [] for name in features}
    for key, task, language, instruction, intersection in GEDIT_ROWS:
        columns["task_type"].append(task)
        columns["key"].append(key)
        columns["instruction"].append(instruction)
        columns["instruction_language"].append(language)
        columns["input_image"].append(Image.new("RGB", (40, 30), colours[key]))
        columns["input_image_raw"].append(Image.new("RGB", (80, 60), colours[key]))
        columns["Intersection_exist"].append(intersection)
    return datasets.Dataset.from_dict(columns, features=features)


@pytest.fixture(scope="module")
def gedit_parquet(tmp_path_factory):
    path = tmp_path_factory.mktemp("gedit") / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir()
    gedit_dataset().to_parquet(str(path))
    return path


def test_gedit_reader_parquet_and_datasets_dir(gedit_parquet, tmp_path):
    items = read_gedit(str(gedit_parquet.parent))
    assert [(item.key, item.language, item.index) for item in items] == [(r[0], r[2], n) for n, r in enumerate(GEDIT_ROWS)]
    assert items[0].image().size == (40, 30) and items[0].intersection_exist and not items[1].intersection_exist
    assert items[0].image("input_image_raw").size == (40, 30)  # not read: falls back to input_image
    assert read_gedit(str(gedit_parquet), image_columns=IMAGE_BOTH)[0].image("input_image_raw").size == (80, 60)
    chosen = read_gedit(str(gedit_parquet), languages=["cn"], task_types=["color_alter"])
    assert [(item.key, item.index) for item in chosen] == [("k2", 4)]
    assert len(read_gedit(str(gedit_parquet), limit=2)) == 2
    gedit_dataset().save_to_disk(str(tmp_path / "disk"))
    from_disk = read_gedit(str(tmp_path / "disk"), image_columns=IMAGE_BOTH)
    assert [item.instruction for item in from_disk] == [row[3] for row in GEDIT_ROWS]
    assert from_disk[2].image().getpixel((0, 0)) == (128, 0, 128) and from_disk[2].image("input_image_raw").size == (80, 60)
    with pytest.raises(Exception, match="unknown task type"):
        read_gedit(str(gedit_parquet), task_types=["ps_human"])


IMAGE_BOTH = ("input_image", "input_image_raw")


# ----------------------------------------------------------------------------------------------------
# end to end through `unimm eval`
# ----------------------------------------------------------------------------------------------------
def test_dpg_end_to_end(tiny_pipeline, vlms, tmp_path, capsys):
    questions = write_questions(tmp_path / "dpg.csv", CSV_ROWS[:6])
    images = tmp_path / "grids"
    assert main(["eval", "dpg", "--images", str(images), "--questions", str(questions), "--model", str(tiny_pipeline),
                 "--steps", "2", "--seed", "3", "--device", "cpu", "--judge-model", str(vlms["yes"]), "--judge-device", "cpu",
                 "--judge-max-new-tokens", "1"]) == 0
    for item_id in ("p1", "p2"):
        with Image.open(images / f"{item_id}.png") as grid:
            assert grid.size == (64, 64)  # 2x2 grid of 32 px tiles
    results = json.loads((images / "dpg_results.json").read_text())
    assert results["scores"]["dpg_bench"] == 100.0 and results["scores"]["failures"]["failed_items"] == 0
    protocol = results["protocol"]
    assert protocol["questions_sha256"] == file_sha256(questions) and protocol["judge"]["model"] == str(vlms["yes"])
    assert (protocol["resolution"], protocol["steps"], protocol["cfg"], protocol["seed"]) == (32, 2, 2.0, 3)
    assert protocol["generation"]["seeds"] == [3, 4, 5, 6] and protocol["prompts_sha256"]
    assert "| DPG-Bench |" in capsys.readouterr().out

    # The random judge: same grids (no regeneration), answers mostly unparseable -- every one counted.
    out = tmp_path / "random.json"
    assert main(["eval", "dpg", "--images", str(images), "--questions", str(questions), "--judge-model", str(vlms["random"]),
                 "--judge-device", "cpu", "--judge-max-new-tokens", "3", "--tiles", "2", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    answers = [answer for record in results["details"] for tile in record["answers"] for answer in tile]
    assert len(answers) == results["scores"]["failures"]["questions_asked"] == 2 * (4 + 2)
    assert results["scores"]["failures"]["unparsed_answers"] == sum(parse_yes_no(answer) is None for answer in answers)
    assert 0.0 <= results["scores"]["dpg_bench"] <= 100.0 and results["protocol"]["tiles"] == 2


def _viescore_stub(body):
    prompt = _prompt_text(body)
    images = sum(part["type"] == "image_url" for part in body["messages"][0]["content"])
    if "Editing instruction:" in prompt:  # semantic consistency: [source, edited]
        if images != 2:
            return 422, "SC expects two images"
        return 200, "not json at all" if "garble" in prompt else '{\n"score" : [6, 8],\n"reasoning" : "ok"\n}'
    if images != 1 or "naturalness" not in prompt:
        return 422, "PQ expects one image"
    return 200, '```json\n{"score": [9, 4], "reasoning": "slightly blurry"}\n```'


def test_gedit_end_to_end(tiny_pipeline, gedit_parquet, stub_server, vlms, tmp_path, capsys):
    root = tmp_path / "results" / "tiny"
    assert main(["eval", "gedit", "--data", str(gedit_parquet), "--root", str(root), "--model", str(tiny_pipeline), "--no-score",
                 "--steps", "2", "--device", "cpu"]) == 0
    for key, task, language, _, _ in GEDIT_ROWS:
        directory = root / "fullset" / task / language
        with Image.open(directory / f"{key}.png") as edited, Image.open(directory / f"{key}_SRCIMG.png") as source:
            assert edited.size == (32, 32) and source.size == (40, 30)  # the source is the row's input_image
    assert json.loads((root / "generation.json").read_text())["fit"] == "squash"
    (root / "fullset" / "color_alter" / "cn" / "k2.png").unlink()  # a missing edit: a failure, not a smaller denominator

    url, state = stub_server(_viescore_stub)
    assert main(["eval", "gedit", "--data", str(gedit_parquet.parent), "--root", str(root), "--judge", "openai", "--judge-model", "stub",
                 "--judge-url", url, "--retries", "2"]) == 0
    results = json.loads((root / "gedit_results.json").read_text())
    o = math.sqrt(6 * 4)
    en, cn = results["scores"]["en"], results["scores"]["cn"]
    assert en["fullset"]["average"] == {"SC": pytest.approx(4.0), "PQ": pytest.approx(8 / 3), "O": pytest.approx(2 * o / 3)}
    assert en["fullset"]["tasks"]["style_change"] == {"SC": 0.0, "PQ": 0.0, "O": 0.0, "n": 1, "failed": 1}
    assert en["intersection"]["average"]["O"] == pytest.approx(o / 2)
    assert cn["fullset"]["average"]["O"] == pytest.approx(o / 2) and cn["fullset"]["tasks"]["color_alter"]["failed"] == 1
    failures = results["scores"]["failures"]
    assert failures == {"missing_image": 1, "unreadable_image": 0, "unparsed": 1, "judge_error": 0, "unparsed_answers": 3,
                        "judge_errors": 0, "failed_items": 2}
    garbled = next(record for record in results["details"] if record["key"] == "k3")
    assert garbled["status"] == "unparsed" and garbled["answers"]["SC"] == ["not json at all"] * 3
    assert len(state.requests) == 4 * 2 + 2  # 4 readable items x (SC, PQ) + 2 re-asks
    protocol = results["protocol"]
    assert protocol["judge"]["kind"] == "openai-compatible" and protocol["data_sha256"] and protocol["steps"] == 2
    assert protocol["flags"]["retries"] == 2 and protocol["generation"]["fit"] == "squash"
    assert "| en | fullset |" in capsys.readouterr().out

    # The tiny random transformers judge: its answers never parse, so both items fail after one re-ask.
    out = tmp_path / "random.json"
    assert main(["eval", "gedit", "--data", str(gedit_parquet), "--root", str(root), "--languages", "en", "--limit", "2",
                 "--judge-model", str(vlms["random"]), "--judge-device", "cpu", "--judge-max-new-tokens", "8", "--retries", "1",
                 "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["scores"]["failures"]["failed_items"] == 2 and results["scores"]["failures"]["unparsed_answers"] == 2 * 2 * 2
    assert results["scores"]["en"]["fullset"]["average"] == {"SC": 0.0, "PQ": 0.0, "O": 0.0}


# ----------------------------------------------------------------------------------------------------
# EditReward
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def editreward_checkpoint(vlms, tmp_path_factory):
    """A random EditReward model on the tiny base, saved as the released format: model.safetensors = state_dict."""
    from safetensors.torch import save_file
    from transformers import AutoProcessor

    from eval.editreward import REWARD_TOKEN, EditRewardModel

    processor = AutoProcessor.from_pretrained(vlms["random"])
    processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    torch.manual_seed(1)
    model = EditRewardModel(tiny_qwen_vl_config(processor.tokenizer, vocab_size=len(processor.tokenizer)))
    directory = tmp_path_factory.mktemp("editreward") / "checkpoint"
    directory.mkdir()
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    assert {"rm_heads.head_0.0.weight", "rm_heads.head_1.5.bias", "model.language_model.embed_tokens.weight", "lm_head.weight"} <= set(state)
    save_file(state, str(directory / "model.safetensors"))
    return directory, state


def _triples():
    return [
        ("Make the circle blue.", Image.new("RGB", (40, 30), "red"), Image.new("RGB", (40, 30), "blue")),
        ("Remove the square and add a much longer description of a small green triangle.", Image.new("RGB", (30, 50), "white"),
         Image.new("RGB", (30, 50), "green")),
    ]


def test_editreward_loads_the_released_format_and_scores_batches(vlms, editreward_checkpoint, tmp_path):
    from eval.editreward import EditRewardScorer

    checkpoint, state = editreward_checkpoint
    scorer = EditRewardScorer.from_checkpoint(checkpoint, base=str(vlms["random"]), device="cpu", dtype="float32", image_pixels=PIXELS, batch_size=2)
    results = scorer.score(_triples())
    assert all(math.isfinite(result["score"]) and math.isfinite(result["log_sigma"]) for result in results)
    assert results[0]["score"] != results[1]["score"]
    for result in results:  # score = mean over the two heads of output[0]
        assert result["score"] == pytest.approx((result["heads"][0][0] + result["heads"][1][0]) / 2)

    # The meta-device construction + assign-load equals a plainly built model with the state loaded into it.
    from eval.editreward import EditRewardModel

    plain = EditRewardModel(scorer.model.config)
    plain.load_state_dict(state)
    plain_scorer = EditRewardScorer(plain, scorer.processor, scorer.reward_token_id, image_pixels=PIXELS, batch_size=2)
    assert [r["score"] for r in plain_scorer.score(_triples())] == pytest.approx([r["score"] for r in results], abs=1e-6)
    assert not any(tensor.is_meta for tensor in [*scorer.model.parameters(), *scorer.model.buffers()])

    # Reference, one unpadded sequence at a time, 1-D positions given as a plain arange: the padded batch matches.
    model = scorer.model
    for triple, result in zip(_triples(), results):
        heads = []
        for head in range(2):
            batch = scorer._batch(head, [triple])
            length = batch["input_ids"].shape[1]
            with torch.no_grad():
                hidden = model.model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                                     position_ids=torch.arange(length).view(1, 1, -1).expand(3, 1, -1)).last_hidden_state
                position = (batch["input_ids"][0] == scorer.reward_token_id).nonzero().item()
                assert position > 2 * 4  # after both images' tokens
                heads.append(model.rm_heads[f"head_{head}"](hidden[0, position]).tolist())
        assert sum(result["heads"], []) == pytest.approx(sum(heads, []), abs=1e-5)

    # The pre-4.52 key names and a torch.save'd {"model": state_dict} load to the same scores.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    renamed = {}
    for key, value in state.items():
        if key.startswith("model.visual."):
            key = key.removeprefix("model.")
        elif key.startswith("model.language_model."):
            key = "model." + key.removeprefix("model.language_model.")
        renamed[key] = value
    torch.save({"model": renamed}, legacy / "model.pth")
    again = EditRewardScorer.from_checkpoint(legacy, base=str(vlms["random"]), device="cpu", dtype="float32", image_pixels=PIXELS)
    assert [r["score"] for r in again.score(_triples())] == pytest.approx([r["score"] for r in results], abs=1e-6)


def test_editreward_end_to_end(vlms, editreward_checkpoint, tmp_path, capsys):
    checkpoint, _ = editreward_checkpoint
    for name, colour in (("src.png", "red"), ("a.png", "blue"), ("b.png", "green")):
        Image.new("RGB", (40, 30), colour).save(tmp_path / name)
    lines = [{"id": "a", "instruction": "Make it blue.", "source": "src.png", "edited": "a.png"},
             {"id": "b", "instruction": "Make it green.", "source": "src.png", "edited": "b.png"},
             {"id": "gone", "instruction": "Make it pink.", "source": "src.png", "edited": "missing.png"}]
    triples = tmp_path / "triples.jsonl"
    triples.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "editreward.json"
    assert main(["eval", "editreward", "--checkpoint", str(checkpoint), "--base", str(vlms["random"]), "--triples", str(triples),
                 "--device", "cpu", "--dtype", "float32", "--image-pixels", str(PIXELS), "--batch-size", "2", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert (results["scores"]["triples"], results["scores"]["scored"], results["scores"]["failures"]["failed"]) == (3, 2, 1)
    scored = [record["score"] for record in results["details"] if record["status"] == "ok"]
    assert results["scores"]["editreward_mean"] == pytest.approx(sum(scored) / 2)
    assert results["details"][2]["status"] == "missing_image"
    assert results["protocol"]["judge"]["checkpoint_sha256"] == file_sha256(checkpoint / "model.safetensors")
    assert results["protocol"]["triples_sha256"] == file_sha256(triples)
    assert "| triples |" in capsys.readouterr().out


def test_editreward_on_a_gedit_layout(vlms, editreward_checkpoint, gedit_parquet, tmp_path):
    from eval.gedit import output_paths

    checkpoint, _ = editreward_checkpoint
    root = tmp_path / "root"
    for item in read_gedit(str(gedit_parquet), languages=["en"]):
        source, edited = output_paths(root, item)
        edited.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), "blue").save(edited)
        if item.key != "k2":  # k2 has no _SRCIMG: the benchmark's input_image stands in
            item.image().save(source)
    out = tmp_path / "editreward.json"
    assert main(["eval", "editreward", "--checkpoint", str(checkpoint), "--base", str(vlms["random"]), "--gedit-root", str(root),
                 "--data", str(gedit_parquet), "--device", "cpu", "--dtype", "float32", "--image-pixels", str(PIXELS), "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert (results["scores"]["triples"], results["scores"]["scored"]) == (5, 3)  # the cn edits were never written
    assert results["scores"]["failures"]["missing_image"] == 2 and set(results["scores"]["by_language"]) == {"en"}
    assert results["protocol"]["data_sha256"] and results["protocol"]["steps"] is None


@pytest.mark.parametrize(("argv", "message"), [
    (["eval", "dpg", "--images", "x"], "scoring needs --questions"),
    (["eval", "dpg", "--images", "x", "--no-score"], "--no-score without --model"),
    (["eval", "gedit", "--data", "/nonexistent/gedit", "--root", "r"], "no GEdit-Bench parquet"),
    (["eval", "editreward", "--checkpoint", "/nonexistent/ckpt", "--triples", "t.jsonl"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1


def test_openai_judge_needs_a_url(tmp_path, capsys):
    questions = write_questions(tmp_path / "q.csv")
    assert main(["eval", "dpg", "--images", str(tmp_path), "--questions", str(questions), "--judge", "openai", "--judge-model", "m"]) == 2
    assert "--judge-url" in capsys.readouterr().err
