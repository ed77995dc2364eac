"""A synthetic intent-classification set for class-incremental learning (Nested Learning arXiv Fig. 6, in the manner of
CLINC-150 and Banking77, which the platform cannot download at run time).

Fifteen intents in five *tasks* of three (``TASKS``: banking, travel, home, food, work). Each intent has a handful of
utterance templates with slots (amounts, names, cities, days, ...) and a label that is plain text, so a language
model answers with the label's tokens: the *generative head* of the protocol in ``class_incremental.py``.

Generation is deterministic: the same seed gives the same examples on any machine. Training and test utterances of
an intent come from the same templates but never coincide: the test set asks whether the model learned the mapping
from wording to label, not the examples. Intents of one task share vocabulary on purpose (three banking requests
all mention money and accounts), so a model must read past the topic to the request.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SLOTS: dict[str, tuple[str, ...]] = {
    "amount": ("$20", "$45", "$100", "$250", "$1,200", "fifty dollars", "ten euros", "$75", "$300", "$9.99"),
    "name": ("Alice", "Bob", "my mom", "Priya", "Carlos", "my landlord", "Wei", "Sam", "my sister", "Omar"),
    "account": ("checking", "savings", "joint", "business", "credit card"),
    "city": ("Paris", "Tokyo", "Chicago", "Lisbon", "Denver", "Nairobi", "Seoul", "Boston", "Madrid", "Lima"),
    "day": ("on Monday", "tomorrow", "on Friday", "next week", "this weekend", "on June 3rd", "tonight", "on Thursday"),
    "past": ("Monday", "yesterday", "last Friday", "this morning", "the weekend", "June 3rd", "last night"),
    "time": ("7 am", "noon", "3:30", "six in the evening", "9 pm", "half past eight", "10 o'clock"),
    "room": ("kitchen", "bedroom", "living room", "office", "hallway", "garage", "bathroom"),
    "number": ("two", "three", "four", "five", "68", "72", "65", "70"),
    "dish": ("lasagna", "pad thai", "pancakes", "chili", "risotto", "tacos", "banana bread", "curry"),
    "item": ("milk", "eggs", "rice", "apples", "coffee", "bread", "spinach", "olive oil"),
    "person": ("the team", "Dana", "my manager", "the client", "Lee", "the design group", "HR"),
    "topic": ("the budget", "the launch", "hiring", "the roadmap", "the quarterly report", "onboarding"),
    "song": ("some jazz", "the Beatles", "my workout playlist", "classical music", "something relaxing", "Adele"),
}

# task -> {label: templates}; a label is what the model must generate after "intent:".
TASKS: dict[str, dict[str, tuple[str, ...]]] = {
    "banking": {
        "lost card": (
            "I can't find my {account} card anywhere since {past}",
            "my card was stolen in {city}, please block it",
            "I think I left my debit card somewhere in {city} {past}",
            "someone took my wallet with the {account} card in it",
            "help, my bank card is missing since {past}, {name} has not seen it",
        ),
        "balance": (
            "how much money was in my {account} account {past}",
            "what's my current {account} balance",
            "do I have {amount} available in {account}",
            "tell me the balance of my {account} account please",
            "check how much I have left in {account} after paying {name}",
        ),
        "transfer": (
            "send {amount} to {name}",
            "move {amount} from {account} to savings",
            "I need to wire {amount} to {name} {day}",
            "transfer {amount} to {name} from my {account} account",
            "pay {name} back {amount}",
        ),
    },
    "travel": {
        "book flight": (
            "get me a plane ticket to {city} {day}",
            "I want to fly to {city} {day}",
            "find flights from {city} leaving around {time}",
            "book a seat on the next flight to {city}",
            "are there any cheap flights to {city} {day}",
        ),
        "hotel": (
            "reserve a room in {city} for {number} nights",
            "I need somewhere to stay in {city} {day}",
            "find me a hotel near the center of {city}",
            "book a double room in {city} starting {day}",
            "any available rooms in {city} for {number} people",
        ),
        "car rental": (
            "rent me a car in {city} {day}",
            "I need a rental car when I land in {city}",
            "can I pick up a car in {city} at {time}",
            "book a compact car in {city} for {number} days",
            "find a car hire at the {city} airport",
        ),
    },
    "home": {
        "lights": (
            "turn off the lights in the {room}",
            "switch on the {room} lamp",
            "dim the {room} lights to half",
            "make the {room} brighter at {time}",
            "turn the lights on in the {room} at {time}",
        ),
        "thermostat": (
            "set the heating to {number} degrees",
            "it's too cold in the {room}, warm it up",
            "lower the temperature in the {room} to {number}",
            "turn the AC on at {time}",
            "make the house {number} degrees by {time}",
        ),
        "music": (
            "play {song} in the {room}",
            "put on {song}",
            "I want to hear {song} at {time}",
            "start {song} on the {room} speaker",
            "can you play {song} a bit louder",
        ),
    },
    "food": {
        "recipe": (
            "how do I make {dish}",
            "give me a recipe for {dish} for {number} people",
            "what do I need to cook {dish}",
            "show me how to bake {dish}",
            "find an easy {dish} recipe to cook {day}",
        ),
        "restaurant": (
            "book a table for {number} at {time}",
            "find a place that serves {dish} in {city}",
            "reserve dinner for {number} people {day}",
            "is there a good {dish} restaurant near me",
            "get us a table in {city} {day} at {time}",
        ),
        "groceries": (
            "add {item} to my shopping list",
            "we are out of {item}, put it on the list",
            "order {item} and {item} for delivery {day}",
            "remind me to buy {item} {day}",
            "put {number} bags of {item} in the grocery cart",
        ),
    },
    "work": {
        "meeting": (
            "schedule a meeting with {person} {day}",
            "set up a call about {topic} at {time}",
            "book the conference room for {person} {day}",
            "move my meeting with {person} to {time}",
            "find a slot to meet {person} about {topic}",
        ),
        "email": (
            "write an email to {person} about {topic}",
            "send {person} a note saying I'm late",
            "reply to {person} about {topic}",
            "draft a message to {person} to send {day}",
            "email {person} the notes on {topic}",
        ),
        "reminder": (
            "remind me about {topic} at {time}",
            "don't let me forget to call {person} {day}",
            "set a reminder for {topic} {day}",
            "ping me at {time} about {topic}",
            "remind me {day} to follow up with {person}",
        ),
    },
}
LABELS: tuple[str, ...] = tuple(label for intents in TASKS.values() for label in intents)


@dataclass(frozen=True)
class Example:
    task: str
    label: str
    utterance: str

    @property
    def prompt(self) -> str:
        """What the model reads; the label's tokens follow it (with a leading space)."""
        return f"{self.utterance}\nintent:"


def _fill(template: str, rng: random.Random) -> str:
    parts = template.split("{")
    out = [parts[0]]
    for part in parts[1:]:
        slot, rest = part.split("}", 1)
        out.append(rng.choice(SLOTS[slot]) + rest)
    return "".join(out)


def intent_examples(task: str, train_per_label: int, test_per_label: int, seed: int) -> tuple[list, list]:
    """(training, test) examples of ``task``'s intents, ``*_per_label`` each, disjoint, shuffled; deterministic."""
    rng = random.Random(f"{seed}/{task}")
    train, test = [], []
    for label, templates in TASKS[task].items():
        seen: set[str] = set()
        utterances = []
        want = train_per_label + test_per_label
        for _ in range(200 * want):  # rejection sampling of distinct utterances; the slots allow hundreds per label
            text = _fill(rng.choice(templates), rng)
            if text not in seen:
                seen.add(text)
                utterances.append(text)
                if len(utterances) == want:
                    break
        if len(utterances) < want:
            raise ValueError(f"intent {label!r} has only {len(utterances)} distinct utterances, {want} asked")
        test += [Example(task, label, u) for u in utterances[:test_per_label]]
        train += [Example(task, label, u) for u in utterances[test_per_label:]]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test
