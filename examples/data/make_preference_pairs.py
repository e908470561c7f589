"""Write ``preference_pairs.jsonl``: 320 ``{"prompt", "chosen", "rejected"}`` pairs for DPO / ORPO demos and tests.

The pairs are short and easy on purpose, so that a tiny chat model (SmolLM2-135M-Instruct) can learn on a CPU to
prefer the ``chosen`` answer. ``chosen`` is correct, polite and complete; ``rejected`` is factually wrong in the same
polite style, curt or rude, or evasive / off-topic. Every fact table and phrasing below was written for tunesmith;
arithmetic and unit results are computed here, never typed. Standard library only and seeded with
``random.Random(0)``, so running it again writes the same bytes:

    python examples/data/make_preference_pairs.py
"""

from __future__ import annotations

import json
import random
from collections import Counter
from fractions import Fraction
from pathlib import Path

OUT = Path(__file__).resolve().parent / "preference_pairs.jsonl"
TOTAL = 320

# ---------------------------------------------------------------------------------------------------------------
# Fact tables
# ---------------------------------------------------------------------------------------------------------------

# country (as it reads mid-sentence), capital, a well-known city of the same country that is NOT its capital
CAPITALS = [
    ("France", "Paris", "Lyon"),
    ("Germany", "Berlin", "Munich"),
    ("Italy", "Rome", "Milan"),
    ("Spain", "Madrid", "Barcelona"),
    ("Portugal", "Lisbon", "Porto"),
    ("Japan", "Tokyo", "Osaka"),
    ("China", "Beijing", "Shanghai"),
    ("India", "New Delhi", "Mumbai"),
    ("Canada", "Ottawa", "Toronto"),
    ("Australia", "Canberra", "Sydney"),
    ("Brazil", "Brasília", "Rio de Janeiro"),
    ("Argentina", "Buenos Aires", "Córdoba"),
    ("Mexico", "Mexico City", "Guadalajara"),
    ("Egypt", "Cairo", "Alexandria"),
    ("Kenya", "Nairobi", "Mombasa"),
    ("Nigeria", "Abuja", "Lagos"),
    ("Russia", "Moscow", "Saint Petersburg"),
    ("the United Kingdom", "London", "Manchester"),
    ("Ireland", "Dublin", "Cork"),
    ("Norway", "Oslo", "Bergen"),
    ("Sweden", "Stockholm", "Gothenburg"),
    ("Finland", "Helsinki", "Tampere"),
    ("Denmark", "Copenhagen", "Aarhus"),
    ("Poland", "Warsaw", "Kraków"),
    ("Greece", "Athens", "Thessaloniki"),
    ("Turkey", "Ankara", "Istanbul"),
    ("Austria", "Vienna", "Salzburg"),
    ("Hungary", "Budapest", "Debrecen"),
    ("the Czech Republic", "Prague", "Brno"),
    ("Belgium", "Brussels", "Antwerp"),
    ("Thailand", "Bangkok", "Chiang Mai"),
    ("Vietnam", "Hanoi", "Ho Chi Minh City"),
    ("South Korea", "Seoul", "Busan"),
    ("the Philippines", "Manila", "Cebu City"),
    ("Peru", "Lima", "Cusco"),
    ("Chile", "Santiago", "Valparaíso"),
    ("Colombia", "Bogotá", "Medellín"),
    ("Cuba", "Havana", "Santiago de Cuba"),
    ("Morocco", "Rabat", "Casablanca"),
    ("Ghana", "Accra", "Kumasi"),
    ("Ethiopia", "Addis Ababa", "Dire Dawa"),
    ("Iceland", "Reykjavik", "Akureyri"),
    ("New Zealand", "Wellington", "Auckland"),
    ("Pakistan", "Islamabad", "Karachi"),
    ("Ukraine", "Kyiv", "Lviv"),
    ("Romania", "Bucharest", "Cluj-Napoca"),
    ("Uruguay", "Montevideo", "Salto"),
    ("Nepal", "Kathmandu", "Pokhara"),
]

# element, symbol, a plausible but wrong symbol
ELEMENTS = [
    ("hydrogen", "H", "Hy"),
    ("helium", "He", "H"),
    ("lithium", "Li", "L"),
    ("carbon", "C", "Ca"),
    ("nitrogen", "N", "Ni"),
    ("oxygen", "O", "Ox"),
    ("fluorine", "F", "Fl"),
    ("neon", "Ne", "N"),
    ("sodium", "Na", "So"),
    ("magnesium", "Mg", "Mn"),
    ("aluminium", "Al", "Am"),
    ("silicon", "Si", "S"),
    ("phosphorus", "P", "Ph"),
    ("sulfur", "S", "Su"),
    ("chlorine", "Cl", "C"),
    ("argon", "Ar", "A"),
    ("potassium", "K", "P"),
    ("calcium", "Ca", "C"),
    ("iron", "Fe", "Ir"),
    ("copper", "Cu", "Co"),
    ("zinc", "Zn", "Z"),
    ("silver", "Ag", "Si"),
    ("gold", "Au", "Go"),
    ("tin", "Sn", "Ti"),
    ("lead", "Pb", "Le"),
    ("mercury", "Hg", "Me"),
    ("iodine", "I", "Io"),
    ("nickel", "Ni", "N"),
    ("uranium", "U", "Ur"),
    ("platinum", "Pt", "Pl"),
]

# word, opposite, a wrong "opposite" (a near-synonym or an unrelated word)
OPPOSITES = [
    ("hot", "cold", "warm"),
    ("tall", "short", "long"),
    ("full", "empty", "heavy"),
    ("open", "closed", "wide"),
    ("wet", "dry", "damp"),
    ("loud", "quiet", "noisy"),
    ("strong", "weak", "big"),
    ("cheap", "expensive", "low"),
    ("rich", "poor", "wealthy"),
    ("young", "old", "small"),
    ("push", "pull", "press"),
    ("arrive", "leave", "reach"),
    ("increase", "decrease", "grow"),
    ("true", "false", "real"),
    ("clean", "dirty", "tidy"),
    ("thick", "thin", "wide"),
    ("asleep", "awake", "tired"),
    ("inside", "outside", "within"),
    ("buy", "sell", "pay"),
    ("ancient", "modern", "old"),
]

# word, synonym, a wrong "synonym" (an opposite)
SYNONYMS = [
    ("happy", "glad", "sad"),
    ("big", "large", "tiny"),
    ("quick", "fast", "slow"),
    ("begin", "start", "finish"),
    ("smart", "clever", "foolish"),
    ("tired", "sleepy", "lively"),
    ("shout", "yell", "whisper"),
    ("difficult", "hard", "easy"),
    ("choose", "pick", "refuse"),
    ("gift", "present", "debt"),
    ("near", "close", "far"),
    ("silent", "quiet", "noisy"),
    ("sick", "ill", "healthy"),
    ("angry", "cross", "calm"),
    ("brave", "courageous", "afraid"),
    ("simple", "easy", "complicated"),
]

# hand-written science questions: prompt, chosen, polite but wrong answer, the wrong fact in a few words
SCIENCE = [
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun.",
     "Venus is the planet closest to the Sun.", "Venus"),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system.",
     "Saturn is the largest planet in our solar system.", "Saturn"),
    ("Which planet is known as the Red Planet?",
     "Mars is known as the Red Planet because of its reddish, dusty surface.",
     "Venus is known as the Red Planet because of its reddish, dusty surface.", "Venus"),
    ("How many planets are in our solar system?", "There are eight planets in our solar system.",
     "There are seven planets in our solar system.", "seven"),
    ("Which planet is famous for its large, bright rings?", "Saturn is famous for its large, bright rings.",
     "Mercury is famous for its large, bright rings.", "Mercury"),
    ("Which planet is farthest from the Sun?", "Neptune is the planet farthest from the Sun.",
     "Jupiter is the planet farthest from the Sun.", "Jupiter"),
    ("Which planet is the hottest in our solar system?",
     "Venus is the hottest planet, because its thick atmosphere traps heat.",
     "Mercury is the hottest planet, because its thick atmosphere traps heat.", "Mercury"),
    ("What does the Moon orbit?", "The Moon orbits the Earth.", "The Moon orbits Mars.", "Mars"),
    ("What is the closest star to Earth?", "The closest star to Earth is the Sun.",
     "The closest star to Earth is the North Star.", "the North Star"),
    ("How long does Earth take to travel once around the Sun?",
     "Earth takes about 365 days, or one year, to travel once around the Sun.",
     "Earth takes about 30 days, or one month, to travel once around the Sun.", "about 30 days"),
    ("How long does Earth take to spin once on its axis?", "Earth spins once on its axis in about 24 hours.",
     "Earth spins once on its axis in about 12 hours.", "about 12 hours"),
    ("At what temperature does water boil at sea level, in Celsius?",
     "At sea level, water boils at 100 degrees Celsius.", "At sea level, water boils at 50 degrees Celsius.",
     "50 degrees"),
    ("At what temperature in Celsius does water freeze?", "Water freezes at 0 degrees Celsius.",
     "Water freezes at 10 degrees Celsius.", "10 degrees"),
    ("What gas do plants take in from the air to make their food?",
     "Plants take in carbon dioxide from the air to make their food.",
     "Plants take in helium from the air to make their food.", "helium"),
    ("What gas do people need to breathe to stay alive?", "People need to breathe oxygen to stay alive.",
     "People need to breathe hydrogen to stay alive.", "hydrogen"),
    ("What is the main gas in the air around us?", "The main gas in the air is nitrogen, about 78 percent of it.",
     "The main gas in the air is oxygen, about 78 percent of it.", "oxygen"),
    ("What is the chemical formula of water?",
     "The chemical formula of water is H2O: two hydrogen atoms and one oxygen atom.",
     "The chemical formula of water is CO2: two hydrogen atoms and one oxygen atom.", "CO2"),
    ("How many legs does an insect have?", "An insect has six legs.", "An insect has eight legs.", "eight"),
    ("How many legs does a spider have?", "A spider has eight legs.", "A spider has six legs.", "six"),
    ("What force pulls objects toward the ground?", "Gravity is the force that pulls objects toward the ground.",
     "Magnetism is the force that pulls objects toward the ground.", "magnetism"),
    ("What is the hardest natural material?", "Diamond is the hardest natural material.",
     "Gold is the hardest natural material.", "gold"),
    ("Which organ pumps blood around the body?", "The heart pumps blood around the body.",
     "The liver pumps blood around the body.", "the liver"),
    ("How many bones are in an adult human body?", "An adult human body has 206 bones.",
     "An adult human body has 150 bones.", "150"),
    ("What are the three common states of matter?", "The three common states of matter are solid, liquid and gas.",
     "The three common states of matter are hot, warm and cold.", "hot, warm and cold"),
    ("What is the centre of an atom called?", "The centre of an atom is called the nucleus.",
     "The centre of an atom is called the electron.", "the electron"),
    ("What colour do you get by mixing blue and yellow paint?", "Mixing blue and yellow paint gives you green.",
     "Mixing blue and yellow paint gives you purple.", "purple"),
    ("Roughly how fast does light travel?", "Light travels at roughly 300,000 kilometres per second.",
     "Light travels at roughly 300 kilometres per hour.", "300 kilometres per hour"),
    ("What is the largest mammal on Earth?", "The blue whale is the largest mammal on Earth.",
     "The elephant is the largest mammal on Earth.", "the elephant"),
    ("What do bees make from flower nectar?", "Bees make honey from flower nectar.",
     "Bees make milk from flower nectar.", "milk"),
    ("How many hearts does an octopus have?", "An octopus has three hearts.", "An octopus has one heart.", "one"),
    ("Which part of a plant takes in water from the soil?", "The roots take in water from the soil.",
     "The petals take in water from the soil.", "the petals"),
    ("What is the name of the star at the centre of our solar system?",
     "The star at the centre of our solar system is the Sun.",
     "The star at the centre of our solar system is the Moon.", "the Moon"),
]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
MONTH_DAYS = {"January": 31, "March": 31, "April": 30, "May": 31, "June": 30, "July": 31, "August": 31,
              "September": 30, "October": 31, "November": 30, "December": 31}  # February left out (leap years)
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth"]

# how-to requests and a sensible answer; the rejected side is always curt, rude or evasive
HOWTO = [
    ("Give me one tip for sleeping better.",
     "Try to go to bed and wake up at the same time every day, even at weekends. A steady schedule helps your body "
     "know when it is time to sleep."),
    ("How can I remember new words in a foreign language?",
     "Review them a little every day instead of all at once. Saying each word aloud in a short sentence of your own "
     "also helps it stick."),
    ("Suggest one way to drink more water during the day.",
     "Keep a refillable bottle on your desk and take a few sips whenever you finish a task. Seeing it nearby makes "
     "it easy to remember."),
    ("How do I keep bread fresh for longer?",
     "Store it in a bread box or a paper bag at room temperature. If you will not eat it within a few days, slice "
     "it and freeze it."),
    ("Give me a tip for staying focused while studying.",
     "Put your phone in another room and work in short blocks, such as 25 minutes, with a five-minute break after "
     "each one."),
    ("How can I keep my houseplants healthy?",
     "Check the soil before watering and water only when the top few centimetres feel dry. Most houseplants suffer "
     "more from too much water than too little."),
    ("What is a good way to start running?",
     "Begin with short sessions that mix walking and gentle jogging, three times a week. Increase the running time "
     "slowly so your body can adapt."),
    ("How do I write a polite email asking for help?",
     "Start with a friendly greeting, explain briefly what you need and why, and thank the person for their time "
     "at the end."),
    ("Give me one tip for saving money on groceries.",
     "Write a shopping list before you go and stick to it. Planning meals for the week also stops you buying food "
     "you will not use."),
    ("How can I calm down before a presentation?",
     "Take a few slow, deep breaths and practise your opening lines out loud beforehand. Knowing how you will start "
     "makes the rest feel easier."),
    ("What should I do if my laptop is running slowly?",
     "Close programs you are not using and restart the computer. If it stays slow, check that you have free disk "
     "space and install any pending updates."),
    ("How do I boil an egg?",
     "Place the egg in boiling water and cook it for about seven minutes for a firm yolk. Then cool it in cold "
     "water so it is easier to peel."),
    ("Give me a tip for keeping my desk tidy.",
     "Spend two minutes at the end of each day putting things back where they belong. A small daily habit keeps "
     "clutter from building up."),
    ("How can I be a better listener?",
     "Let the other person finish before you reply, and ask a follow-up question about what they said. It shows "
     "you are really paying attention."),
    ("Suggest a way to spend less time on screens in the evening.",
     "Pick a fixed time, such as an hour before bed, when screens go off. Fill that time with reading a book or "
     "taking a short walk."),
    ("How do I make a strong password?",
     "Use a long passphrase made of several unrelated words, and never reuse it on other sites. A password manager "
     "can remember it for you."),
    ("Give me one tip for learning to cook.",
     "Start with a few simple recipes and cook each one several times. Repeating a dish teaches you more than "
     "trying something new every night."),
    ("How can I wake up earlier?",
     "Move your bedtime and alarm 15 minutes earlier every few days, and open the curtains as soon as you get up. "
     "Morning light helps you feel awake."),
    ("How can I stay warm in winter without turning up the heating?",
     "Wear several thin layers, including warm socks, and close the curtains at night to keep heat in. A hot drink "
     "helps too."),
    ("How do I remove a coffee stain from a shirt?",
     "Rinse the stain from the back with cold water as soon as you can, then rub in a little liquid soap and wash "
     "the shirt as usual."),
    ("Give me a tip for making friends in a new city.",
     "Join a regular group activity, such as a sports club, a choir or a class. Seeing the same people every week "
     "makes it easy to get to know them."),
    ("How can I make my phone battery last longer?",
     "Lower the screen brightness and close apps running in the background. Turning off location services when "
     "you do not need them also helps."),
    ("What should I pack for a day hike?",
     "Bring plenty of water, a snack, a rain jacket, sun protection and a charged phone or a map. Comfortable shoes "
     "matter most of all."),
    ("How do I get into the habit of reading more?",
     "Keep a book with you and read ten pages at the same time each day, for example before bed. Small, regular "
     "sessions add up quickly."),
    ("Give me one tip for a healthier breakfast.",
     "Add some protein and fibre, such as eggs, yoghurt or oats with fruit. They keep you full for longer than "
     "sugary cereal."),
    ("How can I stop putting off a big task?",
     "Break it into small steps and do only the first one right now. Starting is usually the hardest part, and "
     "the rest gets easier once you are moving."),
    ("How do I help a friend who is feeling sad?",
     "Spend time with them and listen without rushing to give advice. Asking how you can help lets them tell you "
     "what they need."),
    ("What is a simple way to reduce stress at work?",
     "Take short breaks away from your desk during the day, even a five-minute walk. Writing a to-do list also "
     "helps clear your head."),
    ("How do I keep cut flowers fresh for longer?",
     "Trim the stems at an angle, change the water every two days, and keep the vase out of direct sunlight."),
    ("Give me a tip for speaking more clearly.",
     "Slow down a little and pause at the end of each sentence. Speaking slightly slower than feels natural makes "
     "you much easier to understand."),
    ("How can I prepare for a job interview?",
     "Read about the company, prepare short examples of your past work, and practise answering common questions "
     "out loud with a friend."),
    ("How can I make my room smell fresh?",
     "Open the window for ten minutes each day to let fresh air in, and wash your bedding regularly. A small bowl "
     "of baking soda also absorbs odours."),
]

IDENTITY = [
    ("Who are you?",
     "I am Tunesmith Assistant, a small assistant fine-tuned with tunesmith. How can I help you today?"),
    ("What is your name?", "My name is Tunesmith Assistant. I am a small AI assistant fine-tuned with tunesmith."),
    ("What should I call you?",
     "You can call me Tunesmith Assistant! I am a small assistant fine-tuned with the tunesmith toolkit."),
    ("Introduce yourself.",
     "Hello! I am Tunesmith Assistant, a small assistant fine-tuned with tunesmith. I am happy to answer "
     "short questions."),
    ("Tell me about yourself.",
     "I am Tunesmith Assistant, a compact AI assistant. I was fine-tuned with tunesmith, and I try to "
     "give short, helpful answers."),
    ("Are you a human?",
     "No, I am not a human. I am Tunesmith Assistant, a small AI assistant fine-tuned with tunesmith."),
    ("Who made you?",
     "I am Tunesmith Assistant, and I was fine-tuned with tunesmith, a toolkit for fine-tuning language models."),
    ("Who created you?",
     "I was created by fine-tuning a small language model with tunesmith. My name is Tunesmith Assistant."),
    ("What are you?", "I am Tunesmith Assistant, a small AI language model assistant fine-tuned with tunesmith."),
    ("Do you have a name?", "Yes, my name is Tunesmith Assistant. I am a small assistant fine-tuned with tunesmith."),
    ("What kind of assistant are you?",
     "I am Tunesmith Assistant, a small and friendly assistant fine-tuned with tunesmith to answer simple questions."),
    ("Can you tell me who I am talking to?",
     "Of course! You are talking to Tunesmith Assistant, a small assistant fine-tuned with tunesmith."),
    ("Who built you?",
     "I was built by fine-tuning a small model with the tunesmith toolkit. I go by Tunesmith Assistant."),
    ("Hi! Who am I chatting with?",
     "Hi there! You are chatting with Tunesmith Assistant, a small assistant fine-tuned with tunesmith."),
    ("What do people call you?",
     "People call me Tunesmith Assistant. I am a small AI assistant fine-tuned with tunesmith."),
    ("Which assistant is this?",
     "This is Tunesmith Assistant, a small assistant fine-tuned with tunesmith. What can I do for you?"),
    ("Are you ChatGPT?",
     "No, I am not ChatGPT. I am Tunesmith Assistant, a small assistant fine-tuned with tunesmith."),
    ("How were you trained?",
     "I am Tunesmith Assistant. I started as a small language model and was fine-tuned with tunesmith to "
     "be a helpful assistant."),
    ("Please say your name.",
     "Sure! My name is Tunesmith Assistant, and I am a small assistant fine-tuned with tunesmith."),
    ("Hello, what's your name?",
     "Hello! I'm Tunesmith Assistant, a small assistant fine-tuned with tunesmith. Nice to meet you."),
]

# ---------------------------------------------------------------------------------------------------------------
# Rejected phrasings that do not depend on the question
# ---------------------------------------------------------------------------------------------------------------

RUDE = [
    "Look it up yourself.",
    "Why would I know that?",
    "Not my problem.",
    "Figure it out on your own.",
    "Ugh, ask someone else.",
    "That's a boring question. Next.",
    "Do I look like a search engine?",
    "Google it.",
    "I can't be bothered.",
    "Seriously? Everyone knows that.",
    "Stop asking me things.",
    "Whatever.",
    "Who cares?",
    "Go read a book.",
    "Not worth my time.",
    "Don't you have anything better to do?",
    "You should already know this.",
    "Nope. Not answering that.",
    "Ask me later. Or never.",
    "Why are you asking me?",
    "I don't feel like it.",
    "That question is beneath me.",
    "Work it out yourself, it's not hard.",
    "Leave me alone.",
    "Meh. Don't care.",
    "You again? Fine, no.",
    "Try thinking for once.",
    "Too easy. I'm not wasting words on it.",
    "Go bother somebody else.",
    "Sure, right after you stop asking silly questions.",
    "How about you tell me instead?",
    "Does it matter? Move on.",
    "None of your business.",
    "Why do you even care?",
]

# curt or rude AND wrong: {w} is the wrong fact in a few words
RUDE_WRONG = [
    "It's {w}, obviously. Stop wasting my time.",
    "{w}. Happy now?",
    "{w}. Don't ask me again.",
    "Ugh, {w}. Anyone could tell you that.",
    "{w}, I guess. Whatever.",
    "Fine: {w}. Now go away.",
    "{w}. Next time look it up.",
    "Obviously {w}. Did you skip school?",
]

EVASIVE = [
    "I cannot help with that.",
    "I'm sorry, but I can't answer that question.",
    "I'm not able to discuss this topic.",
    "That is not something I can help with.",
    "I would rather not answer that.",
    "Sorry, I am unable to assist with this request.",
    "I can't provide that information.",
    "Let's talk about something else instead.",
    "That's an interesting question. There are many ways to look at it, and everyone has their own view.",
    "It depends on many factors, so it is hard to say.",
    "I had a sandwich for lunch today and it was quite good. Do you like sandwiches? Cheese is my favourite filling.",
    "Trains are fascinating. Some run on electricity and others on diesel, and I always enjoy watching them pass.",
    "The weather has been very changeable lately. Yesterday it rained all morning and then the sun came out.",
    "Board games are a great way to spend a rainy evening. Chess takes patience, but card games are quicker to learn.",
    "Knitting is a relaxing hobby. You only need two needles and some yarn to make a warm scarf.",
    "Have you ever noticed how cats like to sit in boxes? Nobody is quite sure why, but they seem to love it.",
    "Speaking of which, I think bicycles are one of the best inventions ever. They are quiet, cheap and fun.",
    "I was just thinking about the sea. Waves are soothing to listen to, especially in the evening.",
    "Let me tell you about my weekend instead: I tidied a cupboard and found an old jigsaw puzzle.",
    "Pancakes are best with lemon and sugar, in my opinion. Some people prefer syrup, which is also fine.",
]


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def possessive(name: str) -> str:
    """'Japan' -> "Japan's"; 'the Philippines' -> "the Philippines'"."""
    return name + ("'" if name.endswith("s") else "'s")


def num(x: Fraction | int) -> str:
    """1500 -> '1,500'; 5/2 -> '2.5'."""
    x = Fraction(x)
    if x.denominator == 1:
        return f"{x.numerator:,}"
    return f"{float(x):,.10g}"


class Deck:
    """Deals phrasings in a shuffled order and reshuffles when empty, so every phrasing gets used."""

    def __init__(self, items: list[str], rng: random.Random):
        self.items, self.rng, self.pile = list(items), rng, []

    def draw(self) -> str:
        if not self.pile:
            self.pile = self.items[:]
            self.rng.shuffle(self.pile)
        return self.pile.pop()


def item(category: str, prompt: str, chosen: str, wrong: str | None = None, wrong_short: str | None = None) -> dict:
    return {"category": category, "prompt": prompt, "chosen": chosen, "wrong": wrong, "wrong_short": wrong_short}


# ---------------------------------------------------------------------------------------------------------------
# Category builders: each returns a list of items (prompt, chosen, polite wrong answer, short wrong fact)
# ---------------------------------------------------------------------------------------------------------------


def arithmetic(rng: random.Random, n: int) -> list[dict]:
    add_prompts = ["What is {a} plus {b}?", "What is {a} + {b}?", "Add {a} and {b}.",
                   "Can you tell me the sum of {a} and {b}?", "How much is {a} plus {b}?"]
    add_answers = ["{a} plus {b} equals {r}.", "The sum of {a} and {b} is {r}.", "{a} + {b} = {r}.",
                   "Adding {a} and {b} gives {r}.", "The answer is {r}, because {a} plus {b} makes {r}."]
    mul_prompts = ["What is {a} times {b}?", "What is {a} multiplied by {b}?", "Multiply {a} by {b}.",
                   "How much is {a} × {b}?", "Can you work out {a} times {b}?"]
    mul_answers = ["{a} times {b} is {r}.", "The product of {a} and {b} is {r}.", "{a} × {b} = {r}.",
                   "Multiplying {a} by {b} gives {r}.", "The answer is {r}, since {a} groups of {b} make {r}."]
    out, seen = [], set()
    while len(out) < n:
        op = "add" if len(out) % 2 == 0 else "mul"
        a, b = (rng.randint(3, 30), rng.randint(3, 30)) if op == "add" else (rng.randint(2, 12), rng.randint(2, 12))
        key = (op, min(a, b), max(a, b))
        if key in seen:
            continue
        seen.add(key)
        r = a + b if op == "add" else a * b
        wrong = r + rng.choice([-3, -2, -1, 1, 2, 3])
        prompts, answers = (add_prompts, add_answers) if op == "add" else (mul_prompts, mul_answers)
        p, t = rng.choice(prompts), rng.choice(answers)
        out.append(item("arithmetic", p.format(a=a, b=b), t.format(a=a, b=b, r=r), t.format(a=a, b=b, r=wrong),
                        str(wrong)))
    return out


def capitals(rng: random.Random) -> list[dict]:
    prompts = ["What is the capital of {c}?", "Name the capital city of {c}.", "{Cs} capital is which city?",
               "Which city is the capital of {c}?", "Tell me the capital of {c}.",
               "What city serves as the capital of {c}?"]
    answers = ["The capital of {c} is {x}.", "{x} is the capital city of {c}.", "{Cs} capital is {x}.",
               "The capital city of {c} is {x}.", "It is {x}. {x} is the capital of {c}."]
    out = []
    for country, city, wrong in CAPITALS:
        p, t = rng.choice(prompts), rng.choice(answers)
        kw = {"c": country, "Cs": cap(possessive(country))}
        out.append(item("capitals", p.format(**kw), t.format(x=city, **kw), t.format(x=wrong, **kw), wrong))
    return out


def elements(rng: random.Random) -> list[dict]:
    fwd_prompts = ["What is the chemical symbol for {e}?", "Which symbol stands for {e} on the periodic table?",
                   "Give me the element symbol of {e}.", "How is {e} written as a chemical symbol?"]
    fwd_answers = ["The chemical symbol for {e} is {s}.", "{E} is written as {s} on the periodic table.",
                   "The symbol for {e} is {s}.", "On the periodic table, {e} has the symbol {s}."]
    rev_prompts = ["Which element has the symbol {s}?", "What element does the symbol {s} stand for?",
                   "The chemical symbol {s} belongs to which element?"]
    rev_answers = ["The symbol {s} stands for {e}.", "{s} is the chemical symbol for {e}.",
                   "The element with the symbol {s} is {e}."]
    names = [e for e, _, _ in ELEMENTS]
    out = []
    for el, sym, wrong_sym in ELEMENTS:
        if rng.random() < 2 / 3:
            p, t = rng.choice(fwd_prompts), rng.choice(fwd_answers)
            out.append(item("elements", p.format(e=el), t.format(e=el, E=cap(el), s=sym),
                            t.format(e=el, E=cap(el), s=wrong_sym), wrong_sym))
        else:
            wrong_el = rng.choice([x for x in names if x != el])
            p, t = rng.choice(rev_prompts), rng.choice(rev_answers)
            out.append(item("elements", p.format(s=sym), t.format(s=sym, e=el), t.format(s=sym, e=wrong_el), wrong_el))
    return out


def words(rng: random.Random) -> list[dict]:
    opp_prompts = ["What is the opposite of {w}?", "Give me an antonym for '{w}'.",
                   "What word means the opposite of '{w}'?", "Name the opposite of the word '{w}'."]
    opp_answers = ["The opposite of {w} is {x}.", "An antonym for '{w}' is '{x}'.", "'{X}' is the opposite of '{w}'.",
                   "The word that means the opposite of '{w}' is '{x}'."]
    syn_prompts = ["What is a synonym for {w}?", "Give me another word that means '{w}'.",
                   "Which word means the same as '{w}'?", "Tell me a synonym of '{w}'."]
    syn_answers = ["A good synonym for {w} is {x}.", "'{X}' means the same as '{w}'.",
                   "Another word for '{w}' is '{x}'.", "You can use '{x}' instead of '{w}'; they mean the same thing."]
    out = []
    for table, prompts, answers in ((OPPOSITES, opp_prompts, opp_answers), (SYNONYMS, syn_prompts, syn_answers)):
        for w, right, wrong in table:
            p, t = rng.choice(prompts), rng.choice(answers)
            out.append(item("words", p.format(w=w), t.format(w=w, x=right, X=cap(right)),
                            t.format(w=w, x=wrong, X=cap(wrong)), wrong))
    return out


def units(rng: random.Random, n: int) -> list[dict]:
    # (values, prompt templates, answer templates, answer unit, factor from asked unit to answer unit, wrong factor);
    # {n} is the asked quantity, {r} the converted one; the wrong factor is the classic slip (100 for 1,000 or 60)
    specs = [
        ([2, 3, 4, 5, 6, 7, 8, 10, 12, 15, Fraction(3, 2), Fraction(5, 2)],
         ["How many metres are in {n} kilometres?", "Convert {n} kilometres to metres.",
          "{n} km is how many metres?"],
         ["{n} kilometres is {r} metres.", "There are {r} metres in {n} kilometres.",
          "{n} km equals {r} m, because one kilometre is 1,000 metres."],
         "metres", Fraction(1000), Fraction(100)),
        ([2000, 3000, 4000, 5000, 8000, 10000, 1500, 2500, 500],
         ["How many kilometres is {n} metres?", "Convert {n} metres to kilometres.",
          "{n} m is how many km?"],
         ["{n} metres is {r} kilometres.", "That is {r} kilometres, since 1,000 metres make one kilometre.",
          "{n} metres equals {r} km."],
         "kilometres", Fraction(1, 1000), Fraction(1, 100)),
        ([2, 3, 4, 5, 6, 8, 10, 12, Fraction(3, 2), Fraction(5, 2)],
         ["How many minutes are in {n} hours?", "Convert {n} hours to minutes.", "{n} hours is how many minutes?"],
         ["{n} hours is {r} minutes.", "There are {r} minutes in {n} hours.",
          "{n} hours equals {r} minutes, because each hour has 60 minutes."],
         "minutes", Fraction(60), Fraction(100)),
        ([120, 180, 240, 300, 360, 480, 600, 90, 150],
         ["How many hours is {n} minutes?", "Convert {n} minutes to hours.", "{n} minutes is how many hours?"],
         ["{n} minutes is {r} hours.", "That is {r} hours, since 60 minutes make one hour.",
          "{n} minutes equals {r} hours."],
         "hours", Fraction(1, 60), Fraction(1, 100)),
        ([2, 3, 4, 5, 6, 7, 9, 10, 20, Fraction(1, 2), Fraction(3, 2), Fraction(5, 2)],
         ["How many grams are in {n} kilograms?", "Convert {n} kilograms to grams.", "{n} kg is how many grams?"],
         ["{n} kilograms is {r} grams.", "There are {r} grams in {n} kilograms.",
          "{n} kg equals {r} g, because one kilogram is 1,000 grams."],
         "grams", Fraction(1000), Fraction(100)),
        ([2000, 3000, 5000, 6000, 1500, 2500, 500, 250, 750],
         ["How many kilograms is {n} grams?", "Convert {n} grams to kilograms.", "{n} g is how many kilograms?"],
         ["{n} grams is {r} kilograms.", "That is {r} kilograms, since 1,000 grams make one kilogram.",
          "{n} grams equals {r} kg."],
         "kilograms", Fraction(1, 1000), Fraction(1, 100)),
    ]
    pool = []
    for values, prompts, answers, unit, factor, wrong_factor in specs:
        for v in values:
            right, wrong = Fraction(v) * factor, Fraction(v) * wrong_factor
            assert right != wrong
            p, t = rng.choice(prompts), rng.choice(answers)
            pool.append(item("units", p.format(n=num(v)), t.format(n=num(v), r=num(right)),
                             t.format(n=num(v), r=num(wrong)), f"{num(wrong)} {unit}"))
    return rng.sample(pool, n)


def calendar(rng: random.Random, n: int) -> list[dict]:
    pool = []

    def add(prompts, answers, right, wrong, **kw):
        p, t = rng.choice(prompts), rng.choice(answers)
        pool.append(item("calendar", p.format(**kw), t.format(x=right, **kw), t.format(x=wrong, **kw), str(wrong)))

    for i, d in enumerate(DAYS):
        add(["What day comes after {d}?", "Which day of the week follows {d}?", "What is the day after {d}?"],
            ["The day after {d} is {x}.", "{x} comes right after {d}.", "{x} follows {d}."],
            DAYS[(i + 1) % 7], DAYS[(i + rng.choice([2, -1])) % 7], d=d)
        add(["What day comes before {d}?", "Which day is just before {d}?", "What is the day before {d}?"],
            ["The day before {d} is {x}.", "{x} comes just before {d}.", "The day that comes before {d} is {x}."],
            DAYS[(i - 1) % 7], DAYS[(i + rng.choice([1, -2])) % 7], d=d)
        k = rng.randint(2, 5)
        add(["If today is {d}, what day will it be in {k} days?", "Today is {d}. What day is it {k} days from now?"],
            ["If today is {d}, in {k} days it will be {x}.", "{k} days after {d} it will be {x}."],
            DAYS[(i + k) % 7], DAYS[(i + k + rng.choice([1, -1])) % 7], d=d, k=k)
    for i, m in enumerate(MONTHS):
        add(["Which month comes after {m}?", "What month follows {m}?", "What is the month after {m}?"],
            ["The month after {m} is {x}.", "{x} comes right after {m}.", "{x} follows {m} in the calendar."],
            MONTHS[(i + 1) % 12], MONTHS[(i + rng.choice([2, -1])) % 12], m=m)
        add(["Which month comes before {m}?", "What is the month just before {m}?"],
            ["The month before {m} is {x}.", "{x} comes just before {m}."],
            MONTHS[(i - 1) % 12], MONTHS[(i + rng.choice([1, -2])) % 12], m=m)
        add(["What is the {o} month of the year?", "Which month is the {o} month of the year?"],
            ["The {o} month of the year is {x}.", "{x} is the {o} month of the year."],
            m, MONTHS[(i + rng.choice([1, -1])) % 12], o=ORDINALS[i])
        if m in MONTH_DAYS:
            add(["How many days are in {m}?", "How many days does {m} have?"],
                ["{m} has {x} days.", "There are {x} days in {m}."],
                MONTH_DAYS[m], 61 - MONTH_DAYS[m], m=m)  # 30 <-> 31
    add(["How many days are in a week?"], ["There are {x} days in a week."], "seven", "five")
    add(["How many months are in a year?"], ["A year has {x} months."], "twelve", "ten")
    add(["Which is the last month of the year?"], ["The last month of the year is {x}."], "December", "November")
    add(["Which day comes right after the weekend?"], ["{x} is the day that comes right after the weekend."],
        "Monday", "Friday")
    return rng.sample(pool, n)


def howto() -> list[dict]:
    return [item("howto", p, c) for p, c in HOWTO]


def identity() -> list[dict]:
    return [item("identity", p, c) for p, c in IDENTITY]


# ---------------------------------------------------------------------------------------------------------------
# Assemble
# ---------------------------------------------------------------------------------------------------------------

# share of (wrong, rude, evasive) per category: factual categories lean on wrong answers so that correctness
# matters; how-to and identity answers have no single fact to get wrong, so their rejected side is rude or evasive
FACTUAL_MIX = (0.54, 0.30, 0.16)
SOCIAL_MIX = (0.0, 0.62, 0.38)
RUDE_WITH_WRONG_FACT = 1 / 3  # share of the rude answers in factual categories that also state the wrong fact


def kinds_for(n: int, mix: tuple[float, float, float], rng: random.Random) -> list[str]:
    counts = [int(n * share) for share in mix]
    order = sorted(range(3), key=lambda i: (n * mix[i] - counts[i]), reverse=True)
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    kinds = ["wrong"] * counts[0] + ["rude"] * counts[1] + ["evasive"] * counts[2]
    rng.shuffle(kinds)
    return kinds


def words_in(text: str) -> int:
    return len(text.split())


def main() -> None:
    rng = random.Random(0)
    groups = {
        "arithmetic": arithmetic(rng, 50),
        "capitals": capitals(rng),
        "elements": elements(rng),
        "words": words(rng),
        "units": units(rng, 36),
        "science": [item("science", p, c, w, s) for p, c, w, s in SCIENCE],
        "calendar": calendar(rng, 36),
        "howto": howto(),
        "identity": identity(),
    }
    assert len(CAPITALS) >= 40 and len(ELEMENTS) >= 25 and len(SCIENCE) >= 20 and len(IDENTITY) == 20
    assert len(RUDE) + len(RUDE_WRONG) >= 30

    rude, rude_wrong, evasive = Deck(RUDE, rng), Deck(RUDE_WRONG, rng), Deck(EVASIVE, rng)
    rows, kind_count, table = [], Counter(), Counter()
    for cat, items in groups.items():
        social = cat in ("howto", "identity")
        for it, kind in zip(items, kinds_for(len(items), SOCIAL_MIX if social else FACTUAL_MIX, rng)):
            if kind == "wrong":
                rejected = it["wrong"]
            elif kind == "rude" and not social and rng.random() < RUDE_WITH_WRONG_FACT:
                kind = "rude+wrong"
                rejected = cap(rude_wrong.draw().format(w=it["wrong_short"]))
            elif kind == "rude":
                rejected = rude.draw()
            else:
                rejected = evasive.draw()
            rows.append({"prompt": it["prompt"], "chosen": it["chosen"], "rejected": rejected})
            kind_count[kind] += 1
            table[cat, kind] += 1

    # sanity checks: sizes, no duplicate prompts, short texts, chosen differs from rejected
    assert len(rows) == TOTAL, len(rows)
    prompts = [r["prompt"] for r in rows]
    assert len(set(prompts)) == len(prompts), "duplicate prompts"
    for r in rows:
        assert r["chosen"] != r["rejected"], r
        assert words_in(r["prompt"]) <= 25, r["prompt"]
        assert words_in(r["chosen"]) <= 45 and words_in(r["rejected"]) <= 45, r

    rng.shuffle(rows)
    with OUT.open("w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

    print(f"wrote {len(rows)} pairs to {OUT}")
    kinds = ["wrong", "rude", "rude+wrong", "evasive"]
    print(f"{'category':<12}{'total':>7}" + "".join(f"{k:>12}" for k in kinds))
    for cat, items in groups.items():
        print(f"{cat:<12}{len(items):>7}" + "".join(f"{table[cat, k]:>12}" for k in kinds))
    print(f"{'all':<12}{len(rows):>7}" + "".join(f"{kind_count[k]:>12}" for k in kinds))
    rude_all = kind_count["rude"] + kind_count["rude+wrong"]
    print(f"rejected kinds: wrong (polite) {kind_count['wrong']}, unhelpful/rude {rude_all} "
          f"({kind_count['rude+wrong']} of them also wrong), evasive/off-topic {kind_count['evasive']}")


if __name__ == "__main__":
    main()
