"""Regenerate grit_pipeline/data/captions_sample.txt: hand-written captions plus seeded template captions.

The output is the hand-written lines of scripts/captions_handwritten.txt, verbatim and in order,
followed by template captions drawn with a fixed seed until the file holds `--total` lines. Only
`random.Random.random/choice/randint` are used, whose sequences are stable across Python 3 releases,
so the same inputs give a bit-identical file.

    .venv/bin/python scripts/make_caption_sample.py            # rewrite the bundled sample
    .venv/bin/python scripts/make_caption_sample.py --out /tmp/captions.txt
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from pathlib import Path

from grit_pipeline.io import write_bytes_atomic

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_HANDWRITTEN = REPO_ROOT / "scripts" / "captions_handwritten.txt"
DEFAULT_OUT = REPO_ROOT / "grit_pipeline" / "data" / "captions_sample.txt"
DEFAULT_TOTAL = 3000
DEFAULT_SEED = 20230626  # the Kosmos-2 paper's month; any fixed value works

# Characters that str.splitlines() treats as line breaks: none may appear inside a caption.
LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")

# ---------------------------------------------------------------- vocabularies
COLOURS = ["Black", "White", "Navy Blue", "Red", "Burgundy", "Olive Green", "Beige", "Grey", "Pink",
           "Mustard Yellow", "Sky Blue", "Ivory", "Charcoal", "Emerald", "Rose Gold", "Teal", "Coral",
           "Camel", "Lavender", "Khaki", "Silver", "Brown", "Multicolor", "Dusty Rose", "Sage"]
WEAR_MATERIALS = ["Cotton", "Linen", "Leather", "Faux Leather", "Silk", "Wool", "Cashmere", "Denim",
                  "Velvet", "Suede", "Polyester", "Chiffon", "Fleece", "Knit", "Corduroy", "Satin"]
HOME_MATERIALS = ["Stainless Steel", "Bamboo", "Solid Wood", "Ceramic", "Glass", "Rattan", "Acrylic", "Brass",
                  "Marble", "Cast Iron", "Linen", "Velvet", "Cotton", "Walnut", "Terracotta", "Wrought Iron"]
WEAR_STYLES = ["Vintage", "Boho", "Casual", "Elegant", "Slim Fit", "Oversized", "Classic", "Retro", "Summer",
               "Winter", "Floral Print", "Striped", "Plaid", "Lightweight", "Waterproof", "Cute", "Loose Fit"]
HOME_STYLES = ["Vintage", "Boho", "Modern", "Rustic", "Minimalist", "Retro", "Luxury", "Handmade",
               "Mid-Century", "Farmhouse", "Scandinavian", "Industrial", "Decorative", "Nordic"]
WEARABLES = ["Maxi Dress", "T-Shirt", "Hoodie", "Cardigan", "Blazer", "Jeans", "Midi Skirt", "Sneakers",
             "Ankle Boots", "Sandals", "Crossbody Bag", "Tote Bag", "Backpack", "Trench Coat", "Jumpsuit",
             "Pajama Set", "Polo Shirt", "Puffer Jacket", "Scarf", "Beanie", "Wallet", "Bikini Set",
             "Blouse", "Cargo Pants", "Loafers", "Bomber Jacket", "Sweater"]
HOME_ITEMS = ["Throw Pillow Cover", "Coffee Table", "Table Lamp", "Wall Mirror", "Area Rug", "Vase",
              "Bookshelf", "Dining Chair", "Duvet Cover Set", "Plant Pot", "Wall Clock", "Serving Bowl",
              "Cutting Board", "Tea Kettle", "Candle Holder", "Storage Basket", "Bar Stool", "Nightstand",
              "Curtain Panels", "Picture Frame", "Dinner Plate Set", "Coat Rack", "Shower Curtain"]
WEAR_FEATURES = ["with Pockets", "Long Sleeve", "Short Sleeve", "V-Neck", "High Waisted", "Adjustable Strap",
                 "with Zipper", "Hand Wash Only", "Machine Washable", "Gift for Her", "Gift for Him",
                 "Button Down", "Off Shoulder", "Quick Dry", "Breathable", "Stretchy", "Hooded"]
HOME_FEATURES = ["Set of 2", "Set of 4", "Easy Assembly", "Dishwasher Safe", "Eco Friendly", "Non-Slip",
                 "Anti-Scratch", "with Lid", "Housewarming Gift", "for Living Room", "for Bedroom",
                 "Indoor Outdoor", "Space Saving", "Wall Mounted"]
GENDERS = ["Women's", "Men's", "Girls'", "Boys'", "Unisex", "Ladies", "Kids", "Baby", "Mens", "Womens"]
SIZES = ["S", "M", "L", "XL", "XXL", "3XL", "Size 8", "Size 10", "US 7", "EU 39", "UK 6", "One Size",
         "2T", "6-12 Months", "Plus Size 2X", "32W x 30L", "Small", "Medium", "Large"]
DIMENSIONS = ['12"', "18 x 18 inch", "24x36", "60cm", "5' x 7'", "40 x 60 cm", "1.5L", "16 oz", "10 inch",
              "200 x 140 cm", "3 ft", "750ml", "8x10", "45 x 45 cm"]
SHOP_PREFIXES = ["NEW", "Hot Sale", "2024 New", "Free Shipping", "Best Seller", "Clearance", "[Ready Stock]",
                 "Limited Time Deal", "Top Rated"]

PEOPLE = ["young woman", "man", "little girl", "little boy", "elderly man", "senior woman", "teenager",
          "businessman", "businesswoman", "mother", "father", "couple", "group of friends", "child",
          "student", "chef", "doctor", "tourist", "runner", "young man with a beard", "woman with red hair",
          "girl in a yellow dress", "man in a blue shirt", "family", "baby", "grandmother", "photographer",
          "musician", "nurse", "farmer", "teacher", "cyclist", "surfer", "bride", "groom", "artist"]
ACTIONS = ["sitting on a bench", "walking", "reading a book", "drinking coffee", "talking on the phone",
           "riding a bicycle", "playing guitar", "laughing", "smiling", "running", "taking a photo",
           "working on a laptop", "holding an umbrella", "eating ice cream", "looking at the camera",
           "dancing", "cooking dinner", "hiking", "swimming", "waiting for the bus", "painting a wall",
           "carrying a basket of vegetables", "writing in a notebook", "looking out of the window",
           "standing", "sleeping", "waving", "jumping", "flying a kite", "feeding ducks"]
PLACES = ["in the park", "on the beach", "in a cafe", "in the kitchen", "in the office", "on a city street",
          "in the mountains", "in a field of sunflowers", "at the airport", "in the forest", "by the lake",
          "at home", "in the snow", "in the rain", "at the market", "on a rooftop", "in a library",
          "at sunset", "in the garden", "on the balcony", "at the train station", "in a studio",
          "in front of a white wall", "on a boat", "in the desert", "at a wedding", "on a country road"]
ANIMALS = ["dog", "cat", "puppy", "kitten", "horse", "bird", "cow", "sheep", "duck", "rabbit", "fox",
           "deer", "owl", "squirrel", "goat", "parrot", "golden retriever", "tabby cat", "pig", "swan"]
ANIMAL_ADJ = ["small", "big", "black", "white", "brown", "fluffy", "young", "sleepy", "curious", "wet",
              "spotted", "grey", "old", "happy", "tiny"]
# Scenes chain "<animal> <rest prep> <support> [<near prep> <landmark>] [<place>]" so they stay plausible.
REST_PREPOSITIONS = ["on", "under", "next to", "behind", "on top of", "beside", "lying on", "sitting on"]
SUPPORTS = ["table", "chair", "bench", "sofa", "bed", "rug", "rock", "log", "fence", "blanket", "porch",
            "stack of books", "wooden crate", "pile of leaves", "windowsill", "doormat", "tree stump"]
NEAR_PREPOSITIONS = ["in front of", "next to", "near", "by", "under", "at the foot of", "in the shade of"]
LANDMARKS = ["window", "fireplace", "door", "house", "barn", "tree", "brick wall", "car", "fountain",
             "lighthouse", "bookshelf", "lake", "church", "mountain", "garden gate", "tent"]
SCENE_ADJ = ["wooden", "old", "red", "small", "large", "white", "rusty", "green", "stone", "blue",
             "vintage", "tall", "yellow", "empty", "dark", "painted", "weathered", "big", "little"]
ABSTRACTS = ["time", "love", "freedom", "hope", "peace", "happiness", "success", "faith", "courage",
             "friendship", "wisdom", "change", "balance", "trust", "innovation", "growth", "strength",
             "memory", "imagination", "kindness", "justice", "beauty", "truth", "patience", "gratitude"]
ABSTRACT_FRAMES = ["the concept of {a}", "{a} and {b}", "{A} is the answer", "a symbol of {a}",
                   "{A} concept illustration", "quote about {a} and {b}", "the power of {a}",
                   "{A} - motivational poster", "in search of {a}", "{a}, {b} and {c}", "{A}"]
SHORT_NOUNS = ["apple", "rose", "sky", "tree", "shoe", "chair", "cake", "river", "moon", "leaf", "cup",
               "house", "bridge", "guitar", "kitten", "sunflower", "lemon", "pumpkin", "clouds", "road"]
FILE_PREFIXES = ["IMG_", "DSC_", "DSC0", "P100", "IMG-2019", "Screenshot_2021", "photo_", "DCIM_", "GOPR"]
FILE_SUFFIXES = ["", ".jpg", ".JPG", ".png", ".jpeg", " (1)", "-scaled", "_edited"]

# Non-English templates: fixed phrases and agreement-free slots, so every line is grammatical.
FOREIGN_TEMPLATES: dict[str, tuple[list[str], dict[str, list[str]]]] = {
    "de": (["{tier} im {ort}", "Damen {kleid} {farbe}, Größe {groesse}", "Herren {kleid} – Farbe: {farbe}",
            "Blick auf {ziel} bei Sonnenuntergang", "Urlaub in {ziel} {jahr}"],
           {"tier": ["Ein Hund", "Eine Katze", "Ein Pferd", "Ein Vogel", "Ein Fuchs"],
            "ort": ["Garten", "Schnee", "Wald", "Park", "Wohnzimmer"],
            "kleid": ["Sommerkleid", "Strickjacke", "Lederjacke", "Jeans", "Wintermantel"],
            "farbe": ["schwarz", "weiß", "rot", "dunkelblau", "grün", "beige"],
            "groesse": ["36", "38", "40", "42", "S", "M"],
            "ziel": ["den Bodensee", "die Alpen", "Hamburg", "Köln", "München", "die Ostsee"],
            "jahr": ["2019", "2021", "2022", "2023"]}),
    "fr": (["{sujet} dans {lieu}", "Robe {style} pour femme, couleur {couleur}, taille {taille}",
            "Vue sur {ville} au coucher du soleil", "Vacances à {ville} – été {annee}"],
           {"sujet": ["Un chien", "Un chat", "Un enfant", "Un cheval", "Un oiseau"],
            "lieu": ["le jardin", "la neige", "la forêt", "le parc", "la cuisine"],
            "style": ["longue", "courte", "bohème", "vintage", "de soirée"],
            "couleur": ["noir", "blanc", "rouge", "bleu marine", "vert"],
            "taille": ["S", "M", "L", "38", "40"],
            "ville": ["Paris", "Lyon", "Marseille", "Nice", "Bordeaux", "Montréal"],
            "annee": ["2018", "2020", "2022", "2023"]}),
    "es": (["{sujeto} en {lugar}", "Vestido {estilo} para mujer, color {color}, talla {talla}",
            "Atardecer en {ciudad}", "Vacaciones en {ciudad} {anio}"],
           {"sujeto": ["Un perro", "Un gato", "Un niño", "Un caballo", "Una familia"],
            "lugar": ["el jardín", "la playa", "el parque", "la montaña", "la cocina"],
            "estilo": ["largo", "corto", "de fiesta", "de verano", "de novia"],
            "color": ["negro", "blanco", "rojo", "azul marino", "verde"],
            "talla": ["S", "M", "L", "38", "40"],
            "ciudad": ["Madrid", "Sevilla", "Barcelona", "Ciudad de México", "Buenos Aires", "Valencia"],
            "anio": ["2017", "2019", "2022", "2023"]}),
    "zh": (["{颜色}{物品}", "{地点}的{动物}", "新款{颜色}{物品} 包邮", "{城市}夜景"],
           {"颜色": ["红色", "黑色", "白色", "蓝色", "粉色", "绿色"],
            "物品": ["连衣裙", "运动鞋", "背包", "手机壳", "毛衣", "台灯"],
            "地点": ["草地上", "窗台上", "沙发上", "雪地里", "公园里"],
            "动物": ["小狗", "小猫", "兔子", "鸭子", "熊猫"],
            "城市": ["上海", "北京", "广州", "深圳", "重庆", "杭州"]}),
    "ja": (["{色}の{物}", "{場所}で遊ぶ{動物}", "{都市}の風景", "レディース {物} {色} 新作"],
           {"色": ["赤", "黒", "白", "青", "ピンク", "緑"],
            "物": ["ワンピース", "スニーカー", "リュック", "マグカップ", "セーター", "傘"],
            "場所": ["公園", "庭", "海辺", "雪の中", "部屋"],
            "動物": ["犬", "猫", "子供たち", "うさぎ"],
            "都市": ["京都", "大阪", "札幌", "横浜", "奈良", "沖縄"]}),
    "ru": (["{животное} в {место}", "{город} ночью", "Женское платье, цвет: {цвет}, размер {размер}",
            "Отпуск: {город}, {год}"],
           {"животное": ["Собака", "Кошка", "Лошадь", "Птица", "Лиса"],
            "место": ["саду", "парке", "лесу", "снегу", "поле"],
            "город": ["Москва", "Санкт-Петербург", "Казань", "Сочи", "Новосибирск"],
            "цвет": ["чёрный", "белый", "красный", "синий", "зелёный"],
            "размер": ["42", "44", "46", "48"],
            "год": ["2016", "2019", "2021"]}),
    "ar": (["{حيوان} في {مكان}", "منظر ليلي في {مدينة}", "فستان نسائي باللون {لون}"],
           {"حيوان": ["كلب", "قطة", "حصان", "طائر"],
            "مكان": ["الحديقة", "الصحراء", "الثلج", "البيت"],
            "مدينة": ["القاهرة", "دبي", "الرياض", "بيروت", "عمان"],
            "لون": ["الأحمر", "الأسود", "الأبيض", "الأزرق"]}),
}

HASHTAGS = ["#love", "#instagood", "#photooftheday", "#fashion", "#beautiful", "#happy", "#nature",
            "#travel", "#style", "#food", "#art", "#homedecor", "#ootd", "#sunset", "#dogsofinstagram"]
EMOJI = ["😍", "❤️", "🔥", "✨", "😂", "🌸", "☀️", "🎉", "👍", "💯", "🌊", "🐶", "🍕", "💕", "🙌", "🇺🇸"]
URL_TAILS = ["https://www.example.com/p/{n}", "http://shop.example.net/item?id={n}&ref=img",
             "www.example.org/gallery/{n}.html", "https://cdn.example.com/img/{n}_800x800.jpg"]
CONTROL_STRINGS = ["<phrase>", "</phrase>", "<object>", "</object>", "<patch_index_0001>",
                   "<patch_index_0512>", "<patch_index_1023>", "<grounding>", "<image>", "</image>",
                   "</delimiter_of_multi_objects/>", "<p>", "</p>", "<box>", "</box>", "<loc5>",
                   "<loc1000>", "<delim>", "</s>", "<s>"]

# ---------------------------------------------------------------- caption makers
Maker = Callable[[random.Random], str]


def _distinct(rng: random.Random, options: list[str], k: int) -> list[str]:
    """Up to `k` different items of `options`, in draw order."""
    picked: list[str] = []
    for _ in range(k):
        choice = rng.choice(options)
        if choice not in picked:
            picked.append(choice)
    return picked


def make_product(rng: random.Random) -> str:
    """A marketplace product title: gender, style, material, item, features, colour and size."""
    if rng.random() < 0.6:
        item = rng.choice(WEARABLES)
        head = f"{rng.choice(GENDERS)} {rng.choice(WEAR_STYLES)} {rng.choice(WEAR_MATERIALS)} {item}"
        features = _distinct(rng, WEAR_FEATURES, rng.randint(0, 2))
        tail = f"{rng.choice(COLOURS)}, {rng.choice(SIZES)}"
    else:
        head = f"{rng.choice(HOME_STYLES)} {rng.choice(HOME_MATERIALS)} {rng.choice(HOME_ITEMS)}"
        features = _distinct(rng, HOME_FEATURES, rng.randint(0, 2))
        tail = f"{rng.choice(COLOURS)}, {rng.choice(DIMENSIONS)}"
    title = " ".join([head, *features, "-", tail])
    if rng.random() < 0.2:
        title = f"{rng.choice(SHOP_PREFIXES)} {title}"
    return title


def make_stock_photo(rng: random.Random) -> str:
    """A stock-photo description: a person doing something somewhere."""
    person = rng.choice(PEOPLE)
    article = "An" if person[0] in "aeiou" else "A"
    text = f"{article} {person} {rng.choice(ACTIONS)} {rng.choice(PLACES)}"
    if rng.random() < 0.5:
        text = text[len(article) + 1:]
        text = text[0].upper() + text[1:]
    return text


def _with_article(noun: str, rng: random.Random) -> str:
    """'the owl', 'an owl' or 'a dog'."""
    if rng.random() < 0.3:
        return f"the {noun}"
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _noun_phrase(rng: random.Random, nouns: list[str], adjectives: list[str]) -> str:
    """'a wooden table' / 'the dog': a determiner, maybe an adjective, and a noun."""
    noun = rng.choice(nouns)
    if rng.random() < 0.5:
        noun = f"{rng.choice(adjectives)} {noun}"
    return _with_article(noun, rng)


def make_scene(rng: random.Random) -> str:
    """A scene description with a chain of one to three prepositional phrases."""
    parts = [_noun_phrase(rng, ANIMALS, ANIMAL_ADJ), rng.choice(REST_PREPOSITIONS),
             _noun_phrase(rng, SUPPORTS, SCENE_ADJ)]
    if rng.random() < 0.6:
        parts += [rng.choice(NEAR_PREPOSITIONS), _noun_phrase(rng, LANDMARKS, SCENE_ADJ)]
    if rng.random() < 0.3:
        parts.append(rng.choice(PLACES))
    return " ".join(parts)


def make_conjunction(rng: random.Random) -> str:
    """Two subjects joined by 'and' (people or animals), doing something together."""
    first, second = rng.choice(PEOPLE), rng.choice(ANIMALS + PEOPLE)
    while second == first:
        second = rng.choice(ANIMALS + PEOPLE)
    subject = f"{_with_article(first, rng)} and {_with_article(second, rng)}"
    if rng.random() < 0.5:
        subject = subject[0].upper() + subject[1:]
    return f"{subject} {rng.choice(ACTIONS)} {rng.choice(PLACES)}"


def make_pronoun(rng: random.Random) -> str:
    """A caption whose subject is a pronoun or that uses a reflexive."""
    subject, obj, possessive, reflexive = rng.choice([
        ("he", "him", "his", "himself"), ("she", "her", "her", "herself"), ("I", "me", "my", "myself"),
        ("they", "them", "their", "themselves"), ("we", "us", "our", "ourselves")])
    person, person_reflexive = rng.choice([("man", "himself"), ("woman", "herself"), ("girl", "herself"),
                                           ("boy", "himself"), ("kids", "themselves"), ("cat", "itself")])
    frames = [f"{subject} took this photo of {reflexive} {rng.choice(PLACES)}",
              f"the {person} looking at {person_reflexive} in the mirror",
              f"{obj} and {possessive} {rng.choice(ANIMALS)} {rng.choice(PLACES)}",
              f"{subject} made it {reflexive}",
              f"this is {obj} {rng.choice(ACTIONS)}"]
    text = rng.choice(frames)
    return text[0].upper() + text[1:] if rng.random() < 0.5 else text


def make_abstract(rng: random.Random) -> str:
    """A caption built around abstract nouns that cannot be seen."""
    a, b, c = (rng.choice(ABSTRACTS) for _ in range(3))
    return rng.choice(ABSTRACT_FRAMES).format(a=a, b=b, c=c, A=a.capitalize())


def make_short(rng: random.Random) -> str:
    """A very short caption: a bare noun, colour + noun, or a camera file name."""
    roll = rng.random()
    if roll < 0.35:
        return f"{rng.choice(FILE_PREFIXES)}{rng.randint(1, 9999):04d}{rng.choice(FILE_SUFFIXES)}"
    if roll < 0.7:
        return f"{rng.choice(COLOURS).lower()} {rng.choice(SHORT_NOUNS)}"
    return rng.choice(SHORT_NOUNS + ANIMALS)


def make_foreign(rng: random.Random) -> str:
    """A non-English caption from a language's templates and agreement-free slot values."""
    frames, slots = FOREIGN_TEMPLATES[rng.choice(sorted(FOREIGN_TEMPLATES))]
    frame = rng.choice(frames)
    return frame.format(**{name: rng.choice(values) for name, values in slots.items()})


BASE_MAKERS: list[tuple[Maker, float]] = [
    (make_product, 0.30), (make_stock_photo, 0.20), (make_scene, 0.17), (make_conjunction, 0.06),
    (make_pronoun, 0.05), (make_abstract, 0.05), (make_short, 0.10), (make_foreign, 0.04),
]


def pick_maker(rng: random.Random) -> Maker:
    """One caption maker, chosen by the weights in BASE_MAKERS."""
    roll = rng.random() * sum(weight for _, weight in BASE_MAKERS)
    for maker, weight in BASE_MAKERS:
        roll -= weight
        if roll < 0:
            return maker
    return BASE_MAKERS[-1][0]


# ---------------------------------------------------------------- web noise
def add_markup(rng: random.Random, text: str) -> str:
    """Stray HTML, entities, BBCode, URLs or hashtags, as scraped alt-text carries them."""
    kind = rng.randint(0, 5)
    if kind == 0:
        return f"<b>{text}</b>"
    if kind == 1:
        return text.replace(" and ", " &amp; ").replace(" - ", " &ndash; ") + " &amp; more"
    if kind == 2:
        return text.replace(" ", "<br/>", 1)
    if kind == 3:
        return f"[img]{text}[/img]"
    if kind == 4:
        return f"{text} {rng.choice(URL_TAILS).format(n=rng.randint(1000, 999999))}"
    return f"{text} " + " ".join(rng.choice(HASHTAGS) for _ in range(rng.randint(1, 6)))


def add_emoji(rng: random.Random, text: str) -> str:
    """One to three emoji at the end (sometimes also at the start)."""
    tail = "".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 3)))
    return f"{rng.choice(EMOJI)} {text} {tail}" if rng.random() < 0.3 else f"{text} {tail}"


def add_trailing_punctuation(rng: random.Random, text: str) -> str:
    """Trailing '.', '!!!', '...', '?' or ' :)'."""
    return text + rng.choice([".", "!", "!!!", "...", "?", " :)", "!!", " ."])


def add_control_strings(rng: random.Random, text: str) -> str:
    """Insert one to three Kosmos-2 control strings (either spelling) at word boundaries."""
    words = text.split(" ")
    for _ in range(rng.randint(1, 3)):
        words.insert(rng.randint(0, len(words)), rng.choice(CONTROL_STRINGS))
    return " ".join(words)


def make_seo_stuffing(rng: random.Random, min_chars: int = 2100) -> str:
    """A product title followed by a keyword-stuffed tail longer than `min_chars` characters."""
    keywords: list[str] = []
    text = make_product(rng) + " | "
    while len(text) + len(", ".join(keywords)) < min_chars:
        keywords.append(rng.choice([
            f"{rng.choice(COLOURS).lower()} {rng.choice(WEARABLES + HOME_ITEMS).lower()}",
            f"{rng.choice(HOME_STYLES).lower()} {rng.choice(HOME_ITEMS).lower()}",
            f"best {rng.choice(HOME_ITEMS + WEARABLES).lower()} 2024",
            f"cheap {rng.choice(WEARABLES).lower()} for {rng.choice(['women', 'men', 'kids'])}",
            f"{rng.choice(WEAR_MATERIALS).lower()} {rng.choice(WEARABLES).lower()} {rng.choice(WEAR_FEATURES).lower()}",
        ]))
    return text + ", ".join(keywords)


def make_generated(rng: random.Random) -> str:
    """One template caption, sometimes with web noise (markup, emoji, caps, punctuation)."""
    text = pick_maker(rng)(rng)
    roll = rng.random()
    if roll < 0.08:
        text = add_markup(rng, text)
    elif roll < 0.14:
        text = add_emoji(rng, text)
    elif roll < 0.19:
        text = text.upper()
    elif roll < 0.27:
        text = add_trailing_punctuation(rng, text)
    return text


# ---------------------------------------------------------------- assembly
def check_caption(text: str) -> str:
    """Return `text` if it is one visible, single-line caption; raise ValueError otherwise."""
    if not text.strip():
        raise ValueError(f"blank caption: {text!r}")
    if LINE_BREAKS.intersection(text):
        raise ValueError(f"caption contains a line break: {text[:80]!r}")
    return text


def read_handwritten(path: Path) -> list[str]:
    """The hand-written captions, one per line, verbatim."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [check_caption(line) for line in lines]


def generate_captions(handwritten: list[str], total: int, seed: int) -> list[str]:
    """Hand-written captions, then distinct generated ones, with ~1% injections and 6 SEO-stuffed lines."""
    if total < len(handwritten):
        raise ValueError(f"total={total} is below the {len(handwritten)} hand-written captions")
    rng = random.Random(seed)
    captions = list(handwritten)
    seen = set(captions)
    n_seo, n_injection = 6, max(1, total // 100)
    special = ["seo"] * n_seo + ["injection"] * n_injection
    # Spread the special lines evenly through the generated part so any slice sees some.
    n_generated = total - len(captions)
    special_at = {len(captions) + (i + 1) * n_generated // (len(special) + 1): kind for i, kind in enumerate(special)}
    while len(captions) < total:
        kind = special_at.get(len(captions))
        if kind == "seo":
            text = make_seo_stuffing(rng)
        elif kind == "injection":
            text = add_control_strings(rng, pick_maker(rng)(rng))
        else:
            text = make_generated(rng)
        if text in seen:
            continue
        seen.add(text)
        captions.append(check_caption(text))
    return captions


def main(argv: list[str] | None = None) -> int:
    """Write the caption sample file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handwritten", type=Path, default=DEFAULT_HANDWRITTEN)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--total", type=int, default=DEFAULT_TOTAL)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    captions = generate_captions(read_handwritten(args.handwritten), args.total, args.seed)
    write_bytes_atomic(args.out, ("\n".join(captions) + "\n").encode("utf-8"))
    print(f"wrote {len(captions)} captions to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
