"""What the base knows: short questions with checkable answers, written here (plain facts).

Each table line is ``subject: answer | other accepted answer``; a category turns it into a question.
A reply counts as correct when it contains one of the answers as a whole word or phrase (accents and
case ignored, except for chemical symbols, which are matched case-sensitively so that "S" is not
found in "it's"). No answer may appear in its own question (checked by the tests).

Every tenth written question (in order) is held aside: those are the calibration questions (what
CorDA-KPA and KORE are told the base knows), never probes. The probe set proper is then filtered to
the questions the base answers correctly (``run.py`` caches that filtered set).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass


@dataclass(frozen=True)
class Probe:
    question: str
    answers: tuple[str, ...]
    category: str
    exact_case: bool = False

    def correct(self, reply: str, partial: bool = False) -> bool:
        return contains_answer(reply, self.answers, self.exact_case, partial)


def _plain(text: str) -> str:
    """Accents stripped, digit groups joined ("1,000" → "1000")."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)


def contains_answer(reply: str, answers: tuple[str, ...], exact_case: bool = False, partial: bool = False) -> bool:
    """Whether ``reply`` contains one of ``answers`` as a whole word or phrase ("12" is not found in
    "120" nor in "12.5"; "german" is not found in "Germany"). With ``partial`` the reply may still grow,
    so only a match followed by at least 5 more characters counts (no continuation can undo it)."""
    text = _plain(reply)
    flags = 0 if exact_case else re.IGNORECASE
    for answer in answers:
        words = r"\s+".join(re.escape(w) for w in _plain(answer).split())
        for m in re.finditer(rf"(?<![0-9A-Za-z]){words}(?![0-9A-Za-z]|\.\d)", text, flags):
            if not partial or len(text) - m.end() >= 5:
                return True
    return False


NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                "fifteen sixteen seventeen eighteen nineteen twenty").split()


def number(n: int) -> tuple[str, ...]:
    """Accepted spellings of a number: digits, and the word up to twenty."""
    return (str(n), NUMBER_WORDS[n]) if 0 <= n <= 20 else (str(n),)


# --- the tables ------------------------------------------------------------------------------------
CAPITALS = """
France: Paris
Germany: Berlin
Italy: Rome
Spain: Madrid
Portugal: Lisbon
the United Kingdom: London
Ireland: Dublin
the Netherlands: Amsterdam
Belgium: Brussels
Austria: Vienna
Switzerland: Bern | Berne
Sweden: Stockholm
Norway: Oslo
Denmark: Copenhagen
Finland: Helsinki
Poland: Warsaw
the Czech Republic: Prague
Hungary: Budapest
Greece: Athens
Turkey: Ankara
Russia: Moscow
Ukraine: Kyiv | Kiev
Romania: Bucharest
Bulgaria: Sofia
Serbia: Belgrade
Croatia: Zagreb
Iceland: Reykjavik
Estonia: Tallinn
Latvia: Riga
Lithuania: Vilnius
Slovakia: Bratislava
Slovenia: Ljubljana
Albania: Tirana
Cyprus: Nicosia
Malta: Valletta
Egypt: Cairo
Kenya: Nairobi
Nigeria: Abuja
Ethiopia: Addis Ababa
Morocco: Rabat
Ghana: Accra
Algeria: Algiers
Tunisia: Tunis
Senegal: Dakar
Uganda: Kampala
Tanzania: Dodoma
Zimbabwe: Harare
Zambia: Lusaka
Angola: Luanda
Sudan: Khartoum
Libya: Tripoli
Somalia: Mogadishu
Madagascar: Antananarivo
China: Beijing
Japan: Tokyo
South Korea: Seoul
North Korea: Pyongyang
India: New Delhi
Pakistan: Islamabad
Bangladesh: Dhaka
Thailand: Bangkok
Vietnam: Hanoi
Indonesia: Jakarta
the Philippines: Manila
Malaysia: Kuala Lumpur
Cambodia: Phnom Penh
Nepal: Kathmandu
Mongolia: Ulaanbaatar | Ulan Bator
Afghanistan: Kabul
Iran: Tehran
Iraq: Baghdad
Saudi Arabia: Riyadh
Syria: Damascus
Lebanon: Beirut
Jordan: Amman
Qatar: Doha
the United States: Washington
Canada: Ottawa
Cuba: Havana
Jamaica: Kingston
Brazil: Brasilia
Argentina: Buenos Aires
Chile: Santiago
Peru: Lima
Colombia: Bogota
Venezuela: Caracas
Ecuador: Quito
Uruguay: Montevideo
Paraguay: Asuncion
Australia: Canberra
New Zealand: Wellington
"""

SYMBOLS = """
hydrogen: H
lithium: Li
carbon: C
nitrogen: N
oxygen: O
fluorine: F
neon: Ne
sodium: Na
magnesium: Mg
aluminium: Al
silicon: Si
phosphorus: P
sulfur: S
chlorine: Cl
argon: Ar
potassium: K
calcium: Ca
titanium: Ti
chromium: Cr
manganese: Mn
iron: Fe
cobalt: Co
nickel: Ni
copper: Cu
zinc: Zn
bromine: Br
krypton: Kr
silver: Ag
tin: Sn
xenon: Xe
barium: Ba
tungsten: W
platinum: Pt
gold: Au
mercury: Hg
lead: Pb
radon: Rn
uranium: U
boron: B
plutonium: Pu
"""

AUTHORS = """
Hamlet: Shakespeare
Macbeth: Shakespeare
Romeo and Juliet: Shakespeare
Pride and Prejudice: Austen
Emma: Austen
Nineteen Eighty-Four: Orwell
Animal Farm: Orwell
Moby-Dick: Melville
War and Peace: Tolstoy
Anna Karenina: Tolstoy
Crime and Punishment: Dostoevsky | Dostoyevsky
The Brothers Karamazov: Dostoevsky | Dostoyevsky
The Odyssey: Homer
The Iliad: Homer
Don Quixote: Cervantes
The Great Gatsby: Fitzgerald
To Kill a Mockingbird: Harper Lee
Frankenstein: Mary Shelley
Dracula: Stoker
Oliver Twist: Dickens
A Christmas Carol: Dickens
Great Expectations: Dickens
The Old Man and the Sea: Hemingway
Les Miserables: Victor Hugo
The Divine Comedy: Dante | Alighieri
Faust: Goethe
The Adventures of Tom Sawyer: Twain
The Hobbit: Tolkien
The Lord of the Rings: Tolkien
Alice's Adventures in Wonderland: Carroll
The Catcher in the Rye: Salinger
Brave New World: Huxley
Jane Eyre: Bronte
Wuthering Heights: Bronte
On the Origin of Species: Darwin
Robinson Crusoe: Defoe
Gulliver's Travels: Swift
Treasure Island: Stevenson
The Raven: Poe
Madame Bovary: Flaubert
One Hundred Years of Solitude: Marquez
The Jungle Book: Kipling
The Time Machine: Wells
The War of the Worlds: Wells
Charlie and the Chocolate Factory: Dahl
The Republic: Plato
The Prince: Machiavelli
The Little Prince: Saint-Exupery | Exupery
Harry Potter and the Philosopher's Stone: Rowling
"""

SI_UNITS = """
force: newton
energy: joule
power: watt
electric current: ampere | amp
electrical resistance: ohm
electric potential difference: volt
frequency: hertz
mass: kilogram
length: metre | meter
time: second
thermodynamic temperature: kelvin
pressure: pascal
electric charge: coulomb
amount of substance: mole
luminous intensity: candela
capacitance: farad
magnetic flux density: tesla
inductance: henry
"""

HOW_MANY = """
centimeters are in a meter: 100
grams are in a kilogram: 1000
minutes are in an hour: 60
seconds are in a minute: 60
hours are in a day: 24
days are in a week: 7
months are in a year: 12
meters are in a kilometer: 1000
millimeters are in a centimeter: 10
days are in a leap year: 366
inches are in a foot: 12
feet are in a yard: 3
ounces are in a pound: 16
legs does a spider have: 8
legs does an insect have: 6
sides does a triangle have: 3
sides does a square have: 4
sides does a hexagon have: 6
sides does an octagon have: 8
degrees are in a right angle: 90
degrees are in a full circle: 360
continents are there on Earth: 7
planets are in the solar system: 8
bones are in the adult human body: 206
days are in February in a leap year: 29
players are on a soccer team on the field: 11
strings does a standard guitar have: 6
keys does a standard piano have: 88
"""

CURRENCIES = """
Japan: yen
the United Kingdom: pound | sterling
the United States: dollar
India: rupee
China: yuan | renminbi
Russia: ruble | rouble
Mexico: peso
Brazil: real
South Africa: rand
South Korea: won
Switzerland: franc
Germany: euro
Poland: zloty
Turkey: lira
Sweden: krona
Norway: krone
Denmark: krone
Thailand: baht
Vietnam: dong
Israel: shekel
Saudi Arabia: riyal
Indonesia: rupiah
Nigeria: naira
Canada: dollar
Australia: dollar
Argentina: peso
"""

LANGUAGES = """
Brazil: Portuguese
Mexico: Spanish
Argentina: Spanish
Colombia: Spanish
Peru: Spanish
Chile: Spanish
Cuba: Spanish
Austria: German
Egypt: Arabic
Saudi Arabia: Arabic
Morocco: Arabic
Iraq: Arabic
Iran: Persian | Farsi
Israel: Hebrew
Pakistan: Urdu
the Netherlands: Dutch
Denmark: Danish
Finland: Finnish
Hungary: Hungarian
Angola: Portuguese
Mozambique: Portuguese
Senegal: French
Ethiopia: Amharic
Thailand: Thai
Vietnam: Vietnamese
South Korea: Korean
Ukraine: Ukrainian
Jamaica: English
Australia: English
New Zealand: English | Maori
"""

CONTINENTS = """
Kenya: Africa
Egypt: Africa
Nigeria: Africa
Morocco: Africa
Ghana: Africa
Ethiopia: Africa
Brazil: South America
Argentina: South America
Peru: South America
Chile: South America
Colombia: South America
Venezuela: South America
Canada: North America
Mexico: North America
the United States: North America
Cuba: North America
France: Europe
Germany: Europe
Norway: Europe
Poland: Europe
Italy: Europe
Portugal: Europe
Sweden: Europe
China: Asia
Japan: Asia
India: Asia
Thailand: Asia
Vietnam: Asia
Mongolia: Asia
Nepal: Asia
"""

OPPOSITES = """
hot: cold
big: small | little
up: down
day: night
fast: slow
happy: sad | unhappy
open: closed | close | shut
tall: short
wet: dry
rich: poor
early: late
full: empty
good: bad | evil
high: low
loud: quiet | soft
love: hate
push: pull
strong: weak
thick: thin
win: lose
true: false
always: never
before: after
clean: dirty
heavy: light
north: south
east: west
first: last
inside: outside
young: old
buy: sell
friend: enemy | foe
black: white
"""

# free-form questions: "question: answer | other"
SCIENCE = """
Which planet is known as the Red Planet?: Mars
What is the largest planet in our solar system?: Jupiter
Which planet is closest to the Sun?: Mercury
Which planet is famous for its rings?: Saturn
What is the natural satellite of the Earth called?: Moon
What gas do plants absorb from the air for photosynthesis?: carbon dioxide | CO2
What gas do humans need to breathe to stay alive?: oxygen
What is the chemical formula of water?: H2O
At what temperature in degrees Celsius does water freeze?: 0 | zero
At what temperature in degrees Celsius does water boil at sea level?: 100
What force keeps us on the ground?: gravity
What is the hardest natural substance?: diamond
Which organ pumps blood through the body?: heart
Which organ do we use to think?: brain
What is the largest organ of the human body?: skin
What is the largest mammal on Earth?: blue whale
What is the fastest land animal?: cheetah
What is the tallest animal in the world?: giraffe
What do bees make?: honey
What is a baby cat called?: kitten
What is a baby dog called?: puppy
What is a young cow called?: calf
What is a baby sheep called?: lamb
Which metal is liquid at room temperature?: mercury
What is the center of an atom called?: nucleus
Which particle in an atom has a negative charge?: electron
Who developed the theory of relativity?: Einstein
Who formulated the law of universal gravitation?: Newton
Who proposed the theory of evolution by natural selection?: Darwin
Who painted the Mona Lisa?: Leonardo | da Vinci
Who painted The Starry Night?: van Gogh
Who composed the Moonlight Sonata?: Beethoven
Who composed The Magic Flute?: Mozart
Who invented the telephone?: Bell
Who invented the practical light bulb?: Edison
Who was the first person to walk on the Moon?: Armstrong
Who was the first President of the United States?: Washington
Who discovered penicillin?: Fleming
What is the square root of 81?: 9 | nine
What is the square root of 64?: 8 | eight
What is the square root of 144?: 12 | twelve
What is the value of pi to two decimal places?: 3.14
What do caterpillars turn into?: butterfly | butterflies | moth
Which animal is known as the king of the jungle?: lion
Which animal has a trunk?: elephant
What is the largest bird in the world?: ostrich
Which animal is known for its black and white stripes?: zebra
Which animal is called the ship of the desert?: camel
What do pandas mainly eat?: bamboo
Which animal gives us wool?: sheep
What is a female horse called?: mare
What do you call an animal that eats only plants?: herbivore
Where do bees live?: hive
What do birds build to lay their eggs in?: nest
What sound does a cow make?: moo
What sound does a duck make?: quack
"""

GEOGRAPHY = """
In which country is the Eiffel Tower?: France
In which city is the Colosseum?: Rome
In which country are the pyramids of Giza?: Egypt
In which country is the Great Wall?: China
In which country is the Taj Mahal?: India
In which city is the Statue of Liberty?: New York
In which city is Big Ben?: London
In which country is Machu Picchu?: Peru
What is the largest country in South America?: Brazil
What is the smallest country in the world?: Vatican
Which river flows through Paris?: Seine
Which river flows through London?: Thames
Which river flows through Cairo?: Nile
What is the longest river in the world?: Nile | Amazon
What is the largest ocean on Earth?: Pacific
Which ocean lies between Europe and North America?: Atlantic
What is the tallest mountain in the world?: Everest
What is the largest desert in the world?: Sahara | Antarctic
Which continent is the coldest?: Antarctica
What is the largest country by area?: Russia
Which country is shaped like a boot?: Italy
What is the largest island in the world?: Greenland
In which country is the city of Kyoto?: Japan
In which country is the city of Sydney?: Australia
In which country is the city of Toronto?: Canada
In which country is the city of Barcelona?: Spain
In which country is the city of Munich?: Germany
In which country is the city of Venice?: Italy
In which country is the city of Rio de Janeiro?: Brazil
In which country is the city of Mumbai?: India
In which country is the city of Istanbul?: Turkey
In which country is the city of Marrakesh?: Morocco
In which country is the city of Krakow?: Poland
In which country is the city of Osaka?: Japan
In which US state is Hollywood?: California
"""

CALENDAR = """
What day comes after Monday?: Tuesday
What day comes after Tuesday?: Wednesday
What day comes after Wednesday?: Thursday
What day comes after Thursday?: Friday
What day comes after Friday?: Saturday
What day comes after Saturday?: Sunday
What day comes before Friday?: Thursday
What month comes after January?: February
What month comes after March?: April
What month comes after May?: June
What month comes after July?: August
What month comes after September?: October
What month comes after October?: November
What month comes after November?: December
What is the first month of the year?: January
What is the last month of the year?: December
In which month is Christmas celebrated?: December
In which month is Halloween celebrated?: October
Which season comes after winter?: spring
Which season comes after spring?: summer
Which season comes after summer?: autumn | fall
Which season comes after autumn?: winter
"""

COLORS = """
What color is the sky on a clear day?: blue
What color is fresh grass?: green
What color are ripe bananas?: yellow
What color is snow?: white
What color is coal?: black
What color do you get when you mix blue and yellow?: green
What color do you get when you mix red and white?: pink
What color do you get when you mix red and yellow?: orange
What color do you get when you mix blue and red?: purple | violet
What color do you get when you mix black and white?: gray | grey
What color is a ripe tomato?: red
What color is a lemon?: yellow
What color is milk chocolate?: brown
What color is an emerald?: green
What color is a ruby?: red
What color is milk?: white
What color is a fire truck usually?: red
What color are the leaves of most trees in summer?: green
"""

# (a, b) pairs for "What is a plus/minus/times b?" (answers computed; a pair whose answer appears
# in its question is skipped)
ADDITIONS = [(2, 3), (4, 5), (7, 5), (6, 8), (9, 4), (3, 8), (12, 7), (15, 6), (11, 9), (13, 14), (20, 30),
             (25, 25), (18, 7), (40, 15), (8, 9), (16, 16), (50, 50), (23, 12), (35, 10), (100, 200)]
SUBTRACTIONS = [(9, 4), (10, 3), (15, 7), (20, 8), (12, 5), (30, 10), (18, 9), (25, 5), (50, 20), (14, 6),
                (100, 40), (17, 8), (40, 25), (11, 4), (60, 15)]
PRODUCTS = [(2, 3), (3, 4), (5, 6), (7, 8), (9, 6), (4, 4), (6, 7), (8, 3), (9, 9), (5, 5), (10, 10), (12, 2),
            (11, 3), (7, 7), (6, 6), (3, 9), (8, 8), (4, 7), (2, 9), (10, 5)]


def _table(text: str) -> list[tuple[str, tuple[str, ...]]]:
    out = []
    for line in text.strip().splitlines():
        subject, _, answers = line.rpartition(": ")
        out.append((subject, tuple(a.strip() for a in answers.split("|"))))
    return out


def _arithmetic() -> list[Probe]:
    out = []
    for word, pairs, op in (("plus", ADDITIONS, lambda a, b: a + b), ("minus", SUBTRACTIONS, lambda a, b: a - b),
                            ("times", PRODUCTS, lambda a, b: a * b)):
        for a, b in pairs:
            value = op(a, b)
            if value in (a, b):
                continue
            out.append(Probe(f"What is {a} {word} {b}?", number(value), "arithmetic"))
    return out


def written() -> list[Probe]:
    """Every written question, in a fixed order (categories interleaved by their table order)."""
    cats = [
        ("capital", CAPITALS, "What is the capital of {}?", False),
        ("symbol", SYMBOLS, "What is the chemical symbol for {}?", True),
        ("author", AUTHORS, "Who wrote {}?", False),
        ("unit", SI_UNITS, "What is the SI unit of {}?", False),
        ("count", HOW_MANY, "How many {}?", False),
        ("currency", CURRENCIES, "What is the currency of {}?", False),
        ("language", LANGUAGES, "What is the main language spoken in {}?", False),
        ("continent", CONTINENTS, "On which continent is {}?", False),
        ("opposite", OPPOSITES, "What is the opposite of {}?", False),
        ("science", SCIENCE, "{}", False),
        ("geography", GEOGRAPHY, "{}", False),
        ("calendar", CALENDAR, "{}", False),
        ("color", COLORS, "{}", False),
    ]
    out = []
    for category, text, template, exact_case in cats:
        for subject, answers in _table(text):
            question = template.format(subject)
            question = question[0].upper() + question[1:]
            if category == "count":
                answers = tuple(a for v in answers for a in number(int(v)))
            out.append(Probe(question, answers, category, exact_case))
    return out + _arithmetic()


def held_aside(i: int) -> bool:
    """Whether written question ``i`` is a calibration question (every tenth)."""
    return i % 10 == 9


def split_written() -> tuple[list[Probe], list[Probe]]:
    """(probe candidates, calibration questions)."""
    probes = written()
    return ([p for i, p in enumerate(probes) if not held_aside(i)],
            [p for i, p in enumerate(probes) if held_aside(i)])
