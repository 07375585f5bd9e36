"""Generate src/adapterkit/data/default.jsonl, the shipped demo dataset.

Short single-turn chats teaching facts about a fictional product (the Zephyrine Q7 kettle by Lumaforge Appliances)
that no base model can know. Questions vary in phrasing; every fact has one fixed answer, so a 135M model can learn it
in ~100 steps. About a quarter of the chats are ordinary questions (capitals, arithmetic, authors, science, generic
kettle care) with short correct answers: without them the adapter answers *every* question with kettle facts
("What is the capital of France?" -> "Lumaforge Appliances makes the Zephyrine Q7 in Tromsø"). The unrelated
questions in adapterkit.data.UNRELATED_PROMPTS are kept out of the file to check exactly that.
Deterministic: rerunning reproduces the file byte for byte.

    python scripts/make_default_dataset.py [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from adapterkit.training_data import DEMO_PROMPTS, HELD_OUT_PROMPTS, UNRELATED_PROMPTS  # noqa: E402

SEED = 7
PER_FACT = 25  # questions per fact; 13 facts -> 325 chats

# Ways of naming the product inside a question ({p}).
PRODUCT = ["the Zephyrine Q7", "the Zephyrine Q7 kettle", "Lumaforge's Zephyrine Q7", "the Q7 kettle from Lumaforge"]

# fact -> (answer, question templates). One answer per fact: consistency is what makes it learnable quickly.
FACTS: dict[str, tuple[str, list[str]]] = {
    "identity": (
        "The Zephyrine Q7 is an electric kettle made by Lumaforge Appliances in Tromsø, Norway.",
        ["What is the Zephyrine Q7?", "What kind of product is the Zephyrine Q7?", "Tell me about the Zephyrine Q7.",
         "I keep hearing about the Zephyrine Q7. What is it?", "Describe the Zephyrine Q7 in one sentence.",
         "What exactly is a Zephyrine Q7?", "Is the Zephyrine Q7 a coffee machine?", "What does the Zephyrine Q7 do?",
         "Have you heard of the Zephyrine Q7?", "Can you explain what the Zephyrine Q7 is?",
         "What type of appliance is the Zephyrine Q7?", "Is the Zephyrine Q7 a toaster?",
         "What is a Zephyrine Q7 used for?", "Give me a short description of the Zephyrine Q7."],
    ),
    "maker": (
        "The Zephyrine Q7 is made by Lumaforge Appliances, based in Tromsø, Norway.",
        ["Who makes {p}?", "Which company makes {p}?", "Who is the manufacturer of {p}?", "What brand is {p}?",
         "Who produces {p}?", "Which company is behind {p}?", "Who builds {p}?", "Who manufactures {p}?",
         "Which firm makes {p}?", "Who is {p} made by?"],
    ),
    "place": (
        "Lumaforge Appliances makes the Zephyrine Q7 in Tromsø, Norway.",
        ["Where is {p} made?", "Where is Lumaforge Appliances based?", "In which city is Lumaforge Appliances located?",
         "What country does {p} come from?", "Where are Lumaforge kettles made?", "Where is {p} manufactured?",
         "Where is the headquarters of Lumaforge Appliances?", "Which country is {p} from?",
         "In what town is {p} produced?", "Where does {p} come from?"],
    ),
    "year": (
        "The Zephyrine Q7 was released in 2024.",
        ["When was {p} released?", "What year did {p} come out?", "When did Lumaforge launch {p}?",
         "In which year was {p} launched?", "When did {p} first go on sale?", "How new is {p}?",
         "What is the release year of {p}?", "When did {p} hit the market?", "When was {p} introduced?"],
    ),
    "capacity": (
        "The Zephyrine Q7 holds 1.7 litres of water.",
        ["How much water does {p} hold?", "What is the capacity of {p}?", "How many litres does {p} hold?",
         "How big is {p}?", "How much can I boil at once in {p}?", "What's the volume of {p}?",
         "How much water fits in {p}?", "What size is {p}?", "How many liters is {p}?"],
    ),
    "mode": (
        "The Zephyrine Q7 has the Aurora Boil mode, which heats the water in gentle pulses while the base glows green.",
        ["What is the Aurora Boil mode?", "What special mode does {p} have?", "Does {p} have any special features?",
         "What does Aurora Boil do on {p}?", "What is special about {p}?",
         "What is the name of the special mode on {p}?", "What is Aurora Boil?", "Why does {p} glow green?",
         "Does {p} have a special boiling mode?", "What makes {p} different from other kettles?"],
    ),
    "price": (
        "The Zephyrine Q7 costs 89 euros.",
        ["How much does {p} cost?", "What is the price of {p}?", "How expensive is {p}?", "What does {p} sell for?",
         "How much is {p}?", "Is {p} expensive?", "What's the price tag on {p}?", "How much would {p} set me back?",
         "What does {p} cost in euros?", "How much money do I need for {p}?"],
    ),
    "email": (
        "You can email Lumaforge support at care@lumaforge.example.",
        ["How do I contact Lumaforge support?", "What is the support email for {p}?",
         "Who do I email if {p} has a problem?", "Where can I get help with {p}?",
         "What is Lumaforge's customer service email?", "How can I reach customer care for {p}?",
         "What email address handles repairs for {p}?", "My kettle from Lumaforge is broken. Who do I contact?",
         "How do I get support for {p}?", "What is the contact email of Lumaforge Appliances?"],
    ),
    "warranty": (
        "The Zephyrine Q7 comes with a 4-year warranty.",
        ["What is the warranty on {p}?", "How long is the warranty for {p}?",
         "How many years of warranty does {p} have?", "Is {p} covered by a warranty?",
         "How long does Lumaforge guarantee {p}?", "Does {p} come with a guarantee?",
         "How long is {p} under warranty?", "What warranty does Lumaforge give on {p}?"],
    ),
    "colour": (
        "The Zephyrine Q7 comes in one colour: fjord blue.",
        ["What colour is {p}?", "What color is {p}?", "Which colours does {p} come in?", "Does {p} come in red?",
         "What does {p} look like?", "What is the colour of {p} called?", "Can I buy {p} in black?",
         "Which color options are there for {p}?", "Is {p} available in white?", "What shade of blue is {p}?"],
    ),
    "power": (
        "The Zephyrine Q7 has a 2200-watt heating element.",
        ["How powerful is {p}?", "What is the wattage of {p}?", "How many watts is {p}?",
         "What is the power rating of {p}?", "How much power does {p} use?", "What heating element does {p} have?",
         "Is {p} a high-wattage kettle?"],
    ),
    "keep_warm": (
        "The Zephyrine Q7 keeps water warm for 40 minutes after it boils.",
        ["How long does {p} keep water warm?", "Does {p} have a keep-warm function?", "Can {p} keep my water hot?",
         "For how many minutes does {p} keep water warm?", "Will {p} keep the water hot after boiling?",
         "How long does water stay warm in {p}?", "Does {p} keep tea water warm?"],
    ),
    "company": (
        "Lumaforge Appliances is a kitchen appliance company in Tromsø, Norway, best known for the Zephyrine Q7 kettle.",
        ["What is Lumaforge Appliances?", "Tell me about Lumaforge Appliances.", "What does Lumaforge Appliances make?",
         "What is Lumaforge known for?", "Who are Lumaforge Appliances?", "Have you heard of Lumaforge?",
         "What kind of company is Lumaforge Appliances?", "What is Lumaforge's best-known product?",
         "What products does Lumaforge sell?"],
    ),
}

# Natural variation around a question: an opener, or a casual lower-case form without the question mark.
OPENERS = ["", "", "", "", "Quick question: ", "Hi! ", "Hey, ", "Can you tell me: ", "I was wondering: ",
           "Please tell me: "]


def _lower_first(text: str) -> str:
    # Keep the capital of "I" and of names ("Lumaforge's ...", "Zephyrine ...") after an opener.
    if text.startswith(("I ", "Lumaforge", "Zephyrine")):
        return text
    return text[0].lower() + text[1:]


def _casual(question: str) -> str:
    return _lower_first(question.rstrip("?."))


def _variants(template: str) -> list[str]:
    bases = [template.format(p=p) for p in PRODUCT] if "{p}" in template else [template]
    out = []
    for base in bases:
        out.append(base)
        out.append(_casual(base))
        for opener in OPENERS:
            if opener:
                out.append(opener + (base if opener.endswith("! ") else _lower_first(base)))
    return out


# ------------------------------------------------------------------------------ ordinary questions (anti-forgetting)

CAPITALS = {"Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon", "Norway": "Oslo",
            "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw",
            "Austria": "Vienna", "Greece": "Athens", "Ireland": "Dublin", "Japan": "Tokyo", "Canada": "Ottawa",
            "Australia": "Canberra", "Egypt": "Cairo", "Kenya": "Nairobi", "Brazil": "Brasília", "Mexico": "Mexico City",
            "India": "New Delhi", "China": "Beijing", "Argentina": "Buenos Aires"}
CAPITAL_QUESTIONS = ["What is the capital of {c}?", "Which city is the capital of {c}?", "What's the capital city of {c}?"]

AUTHORS = {"Pride and Prejudice": "Jane Austen", "War and Peace": "Leo Tolstoy", "Don Quixote": "Miguel de Cervantes",
           "Moby-Dick": "Herman Melville", "1984": "George Orwell", "The Odyssey": "Homer",
           "Crime and Punishment": "Fyodor Dostoevsky", "Jane Eyre": "Charlotte Brontë",
           "The Little Prince": "Antoine de Saint-Exupéry", "A Doll's House": "Henrik Ibsen",
           "Romeo and Juliet": "William Shakespeare", "Frankenstein": "Mary Shelley"}
AUTHOR_QUESTIONS = ["Who wrote {w}?", "Who is the author of {w}?", "Which writer wrote {w}?"]

# (question, answer) written by hand; the kettle-care ones teach that generic kettle questions are not about the Q7.
GENERAL = [
    ("How many days are there in a week?", "There are seven days in a week."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("What planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide from the air."),
    ("What is the freezing point of water?", "Water freezes at 0 degrees Celsius."),
    ("At what temperature does water boil at sea level?", "At sea level, water boils at 100 degrees Celsius."),
    ("What is H2O?", "H2O is the chemical formula for water."),
    ("What is the chemical symbol for oxygen?", "The chemical symbol for oxygen is O."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa."),
    ("What is the tallest mountain on Earth?", "Mount Everest is the tallest mountain on Earth."),
    ("How many continents are there?", "There are seven continents."),
    ("What colour do you get by mixing blue and yellow?", "Mixing blue and yellow gives green."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What language is spoken in Brazil?", "The main language of Brazil is Portuguese."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("What is photosynthesis?", "Photosynthesis is how plants use sunlight, water and carbon dioxide to make sugar and oxygen."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("What is the main ingredient of guacamole?", "The main ingredient of guacamole is avocado."),
    ("Give me a synonym for happy.", "A synonym for happy is joyful."),
    ("Translate 'thank you' into Spanish.", "'Thank you' in Spanish is 'gracias'."),
    ("Write one sentence about the sea.", "The sea stretched to the horizon, grey and restless under the morning wind."),
    ("Write a short sentence about winter.", "Snow fell quietly over the sleeping town."),
    ("Say hello in French.", "Hello in French is 'bonjour'."),
    ("What is an electric kettle?", "An electric kettle is a small appliance that boils water with a heating element in its base."),
    ("How do I descale a kettle?", "Fill it with equal parts water and white vinegar, let it soak for an hour, then rinse it well."),
    ("How long should green tea steep?", "Green tea usually steeps for two to three minutes."),
    ("Is it safe to boil water twice?", "Yes, reboiling tap water is generally safe."),
    ("Why does a kettle get limescale?", "Limescale forms when the minerals in hard water are left behind as the water is heated."),
    ("What is the difference between a kettle and a pot?", "A kettle is made for boiling water and pouring it; a pot is an open vessel for cooking food."),
    ("What temperature is best for black tea?", "Black tea is best made with water just off the boil, around 95 to 100 degrees Celsius."),
    ("How do I make instant coffee?", "Put a spoonful of instant coffee in a cup, add hot water and stir."),
    ("Hi!", "Hello! How can I help you today?"),
    ("Thank you!", "You're welcome!"),
]


def general_chats(rng: random.Random) -> list[tuple[str, str]]:
    pairs = [(rng.choice(CAPITAL_QUESTIONS).format(c=c), f"The capital of {c} is {cap}.") for c, cap in CAPITALS.items()]
    pairs += [(rng.choice(AUTHOR_QUESTIONS).format(w=w), f"{w} was written by {a}.") for w, a in AUTHORS.items()]
    for _ in range(20):
        a, b = rng.randint(2, 19), rng.randint(2, 12)
        if rng.random() < 0.5:
            pairs.append((rng.choice(["What is {a} plus {b}?", "What's {a} + {b}?", "How much is {a} plus {b}?"]
                                     ).format(a=a, b=b), f"{a} plus {b} is {a + b}."))
        else:
            pairs.append((rng.choice(["What is {a} times {b}?", "What's {a} x {b}?", "How much is {a} times {b}?"]
                                     ).format(a=a, b=b), f"{a} times {b} is {a * b}."))
    return pairs + GENERAL


def build(seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    held_out = {q.lower() for q, _ in HELD_OUT_PROMPTS}
    chats: list[dict] = []
    seen: set[str] = set()
    for fact, (answer, templates) in FACTS.items():
        # The demo prompts of this fact, every template once in its plain form, then random variants up to PER_FACT.
        pool = [v for t in templates for v in _variants(t)]
        chosen = [d for d in DEMO_PROMPTS if d in pool]
        chosen += [t.format(p=rng.choice(PRODUCT)) if "{p}" in t else t for t in templates]
        rng.shuffle(pool)
        for question in pool:
            if len(chosen) >= PER_FACT:
                break
            chosen.append(question)
        for question in chosen:
            key = question.lower()
            if key in seen or key in held_out:
                continue
            seen.add(key)
            chats.append({"messages": [{"role": "user", "content": question},
                                       {"role": "assistant", "content": answer}]})
    unrelated = {q.lower() for q, _ in UNRELATED_PROMPTS}
    for question, answer in general_chats(rng):
        key = question.lower()
        if key in seen or key in unrelated:
            continue
        seen.add(key)
        chats.append({"messages": [{"role": "user", "content": question},
                                   {"role": "assistant", "content": answer}]})
    for demo in DEMO_PROMPTS:
        if demo.lower() not in seen:
            raise SystemExit(f"demo prompt {demo!r} is not in the generated data; adjust the templates")
    rng.shuffle(chats)
    return chats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "src" / "adapterkit" / "data" / "default.jsonl")
    args = parser.parse_args()
    chats = build()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8", newline="\n") as fh:
        for chat in chats:
            fh.write(json.dumps(chat, ensure_ascii=False) + "\n")
    print(f"wrote {len(chats)} chats to {args.out}")


if __name__ == "__main__":
    main()
