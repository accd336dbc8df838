"""A tiny, deterministic, offline Hugging Face tokenizer for tests and tiny checkpoints.

Byte-level BPE (GPT-2 / SmolLM2 style) trained on a fixed English text embedded here, so
building it needs no network and two builds write byte-identical ``tokenizer.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VOCAB_SIZE = 1000
END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [END_OF_TEXT, IM_START, IM_END]  # ids 0, 1, 2 in this order

# ChatML, like SmolLM2's template but without its built-in default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TRAINING_TEXT = """\
Question: What is the capital of France?
Answer: Paris is the capital of France.
Question: How many legs does a spider have?
Answer: A spider has 8 legs, while an insect has 6.
Question: Which gas do plants absorb from the air?
Answer: carbon dioxide
Question: What is 12 plus 30?
Answer: 42
Question: Who wrote the play Romeo and Juliet?
Answer: William Shakespeare wrote it around 1595.
The quick brown fox jumps over the lazy dog. The five boxing wizards jump quickly.
Pack my box with five dozen liquor jugs! How vexingly quick daft zebras jump?
The following are multiple choice questions (with answers) about high school biology.
A. mitochondria B. nucleus C. ribosome D. chloroplast
Answer: A
The following are multiple choice questions (with answers) about world history.
In 1492, Columbus sailed across the Atlantic Ocean; in 1969, astronauts walked on the Moon.
Water boils at 100 degrees Celsius (212 degrees Fahrenheit) at sea level.
The Earth orbits the Sun once every 365.25 days, and the Moon orbits the Earth in 27.3 days.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 50 75 100 1000 2024 3.14
Punctuation marks include the comma, the period, the colon: the semicolon; and the dash -.
"Quotation marks" and 'apostrophes' are common in text, as are (parentheses) and [brackets].
She said, "I will be there at 5:30 p.m., unless it rains." He replied: "Fine, see you then!"
Science is the systematic study of the structure and behaviour of the physical world.
Mathematics studies numbers, shapes, patterns, and the relationships between them.
A triangle has three sides; a square has four equal sides; a hexagon has six sides.
If x = 3 and y = 4, then x + y = 7, x * y = 12, and the hypotenuse is 5.
Photosynthesis converts light energy into chemical energy stored in sugar molecules.
The heart pumps blood through arteries, veins, and capillaries to every organ in the body.
Electricity flows through a circuit when the switch is closed and stops when it is open.
Gravity pulls objects toward each other; heavier objects do not fall faster in a vacuum.
The library opens at nine in the morning and closes at six in the evening on weekdays.
Children played in the park while their parents talked quietly on the wooden benches.
Rain fell all night, and by the morning the river had risen above its banks.
The committee approved the new budget after a long discussion about schools and roads.
Farmers grow wheat, corn, rice, and potatoes, and they raise cattle, sheep, and chickens.
The museum displays paintings, sculptures, ancient coins, and tools made of stone and bronze.
A good scientist asks questions, forms a hypothesis, tests it, and reports the results.
Computers store information as bits, and eight bits make one byte of memory.
The train to the city leaves every hour, and the journey takes about forty minutes.
Winter is cold, summer is warm, and spring and autumn are usually mild and pleasant.
Most birds can fly, but penguins swim instead, and ostriches run very fast on land.
The teacher explained the lesson again because several students did not understand it.
Economists study how people, firms, and governments make choices about scarce resources.
Philosophy asks what we can know, how we should live, and what makes an argument valid.
An atom has a nucleus of protons and neutrons, surrounded by a cloud of electrons.
Chemical reactions rearrange atoms; the total mass before and after remains the same.
The ancient Romans built roads, bridges, and aqueducts that still stand today.
Music combines rhythm, melody, and harmony; some songs are slow and others are fast.
The doctor told the patient to rest, drink water, and return if the fever did not go away.
People speak thousands of languages, and many of them are written with different scripts.
The ocean covers about seventy percent of the planet and holds most of its water.
Volcanoes erupt when pressure from molten rock beneath the surface becomes too great.
Good writing is clear, concise, and correct; it respects the reader's time and attention.
Question: Which planet is known as the Red Planet?
Answer: Mars
Question: What is the largest mammal on Earth?
Answer: The blue whale is the largest mammal.
Question: What is the freezing point of water?
Answer: Water freezes at 0 degrees Celsius.
Question: How many continents are there?
Answer: There are seven continents.
Question: What do bees make?
Answer: Bees make honey and wax.
user: Hello! Can you help me with my homework, please?
assistant: Of course. Tell me what the question is, and we will solve it step by step.
system: You are a helpful assistant. Answer briefly and politely.
Step 1: read the problem. Step 2: write what you know. Step 3: compute the answer.
Therefore, the answer is (B). Thus, the final answer is 17. So the result is true, not false.
Yes or no? True or false? Always, sometimes, never. Before, during, after. Above, below, between.
"""


def build_tiny_tokenizer(directory: Path) -> None:
    """Train the tiny tokenizer and write it to ``directory`` in Hugging Face layout.

    The two JSON config files are written here rather than by ``save_pretrained``:
    transformers 5 writes ``"tokenizer_class": "TokenizersBackend"`` and a list-valued
    ``extra_special_tokens`` that transformers 4 cannot load; this layout loads in both.
    """
    directory.mkdir(parents=True, exist_ok=True)
    _train_byte_level_bpe().save(str(directory / "tokenizer.json"), pretty=True)
    special_tokens = {
        "bos_token": None,
        "eos_token": IM_END,
        "unk_token": END_OF_TEXT,
        "pad_token": END_OF_TEXT,
        "additional_special_tokens": [IM_START, IM_END],
    }
    config = {
        **special_tokens,
        "add_bos_token": False,
        "add_eos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    _write_json(directory / "tokenizer_config.json", config)
    _write_json(directory / "special_tokens_map.json", special_tokens)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _train_byte_level_bpe():  # -> tokenizers.Tokenizer (imported lazily)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps character offsets exact, which text_offset relies on.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True), trainer=trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(
            f"tiny tokenizer has {tokenizer.get_vocab_size()} tokens, expected {VOCAB_SIZE}: "
            "TRAINING_TEXT is too short to learn enough merges; add more varied text to it"
        )
    return tokenizer
