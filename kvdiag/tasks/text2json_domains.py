"""The four Text2JSON domains: word lists, value generators and phrasing templates.

Each domain has a `name` key plus two attribute keys. Templates use {name}, {a1}, {a2}:
- `full`: the entity with both attributes (goes into the gold);
- `partial`: the entity with one attribute only (near miss: the instruction asks for both);
- `excluded`: both attributes, but the entity is said to be out (discontinued, retired, dissolved,
  never released); the instruction says to leave those out.
Values never contain "[" or "]" (the metric's validity gate counts brackets).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

_FIRST = "Amelia Rafael Priya Jonas Ingrid Mateo Yuki Chloe Tobias Leila Marcus Sofia Emeka Hannah Dmitri Aisha Lucas Freya Omar Nadia Viktor Elena Samuel Mei Gabriel Astrid Kofi Clara Henrik Zara Felix Imogen".split()
_LAST = "Okafor Lindqvist Moreau Castellano Nakamura Brennan Haddad Kowalski Ferreira Whitfield Sorensen Adeyemi Rossi Delacroix Petrov Mahmoud Gallagher Tanaka Novak Albright Esposito Lindgren Oyelaran Vasquez Hartmann O'Donnell Quintero Sato Blackwood Ivanova Mbeki Thornton".split()


def _person(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"


@dataclass(frozen=True)
class Domain:
    key: str  # registry value of the `domain` knob
    noun: str  # "product"
    plural: str  # "products"
    attrs: tuple[str, str]  # JSON keys besides "name"
    attr_words: tuple[str, str]  # how the instruction names them
    excluded_rule: str  # "... leave out any product that the document says {excluded_rule}"
    value_notes: str  # extra formatting rules for the values
    make: Callable[[random.Random], tuple[str, str, str]]  # rng -> (name, a1, a2)
    full: tuple[str, ...]
    partial: tuple[str, ...]
    excluded: tuple[str, ...]


_BRANDS = "Aurelo Brixton Calder Dunmore Everly Fenwick Galloway Halden Iverson Juniper Kessler Lumina Marlow Norland Orrin Pellam Quorra Rydell Solvay Tamsin".split()
_MODELS = "Aero Nova Pulse Vista Echo Terra Flux Orbit Prism Summit Drift Glide Halo Quill Rook Sable Tempo Vireo".split()
_SUFFIX = ["", "", " Pro", " Mini", " Plus", " 2", " Max", " Lite"]
_CATEGORIES = "kitchen appliances|headphones|office chairs|running shoes|children's books|board games|garden tools|smart watches|camping gear|desk lamps|coffee makers|backpacks".split(
    "|"
)


def _product(rng: random.Random) -> tuple[str, str, str]:
    name = f"{rng.choice(_BRANDS)} {rng.choice(_MODELS)}{rng.choice(_SUFFIX)}"
    return name, rng.choice(_CATEGORIES), str(rng.randint(5, 1999))


_SPECIALTIES = "cardiology dermatology pediatrics neurology oncology orthopedics psychiatry radiology endocrinology ophthalmology gastroenterology rheumatology".split()
_US_CITIES = "Portland Austin Denver Boston Seattle Chicago Phoenix Atlanta Madison Raleigh Tucson Omaha Cleveland Savannah Sacramento Pittsburgh".split()


def _doctor(rng: random.Random) -> tuple[str, str, str]:
    return _person(rng), rng.choice(_SPECIALTIES), rng.choice(_US_CITIES)


_ORG_WORDS = "Northwind Bluepeak Ironbridge Silverline Redwood Clearwater Stonegate Brightpath Oakridge Harborview Greenfield Lakeshore Westbrook Eastgate Highland Crestline".split()
_ORG_SUFFIX = "Systems Partners Holdings Labs Group Industries Logistics Analytics Works".split()
_INDUSTRIES = "renewable energy|logistics|software|food processing|telecommunications|biotechnology|retail|insurance|aerospace|publishing|agriculture|construction".split(
    "|"
)
_HQ_CITIES = "Rotterdam Toronto Melbourne Lyon Osaka Dublin Oslo Zurich Lisbon Vancouver Helsinki Edinburgh Auckland Munich Montreal Antwerp".split()


def _organization(rng: random.Random) -> tuple[str, str, str]:
    return (
        f"{rng.choice(_ORG_WORDS)} {rng.choice(_ORG_SUFFIX)}",
        rng.choice(_INDUSTRIES),
        rng.choice(_HQ_CITIES),
    )


_TITLE_ADJ = "Silent Broken Golden Hidden Last Distant Crimson Forgotten Endless Quiet Burning Winter Paper Hollow Midnight Salt".split()
_TITLE_NOUN = "Harbor Orchard Frontier Lighthouse Garden Station Season Mirror River Kingdom Letter Compass Parade Horizon Tide Carousel".split()


def _movie(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.choice(_TITLE_ADJ), rng.choice(_TITLE_NOUN)
    title = rng.choice([f"The {a} {b}", f"{a} {b}", f"A {a} {b}", f"{b} of the {a} Sky"])
    return title, _person(rng), str(rng.randint(1952, 2023))


DOMAINS: dict[str, Domain] = {
    d.key: d
    for d in [
        Domain(
            "products",
            "product",
            "products",
            ("category", "price"),
            ("category", "price"),
            "was discontinued or cancelled",
            'Give "price" in US dollars as digits only (for example "149"), without the dollar sign.',
            _product,
            full=(
                "The {name} is listed under {a1} and sells for ${a2}.",
                "Shoppers looking for {a1} will find the {name}, which retails at ${a2}.",
                "Priced at ${a2}, the {name} belongs to our {a1} range.",
                "Among the {a1} on offer, the {name} costs {a2} dollars.",
                "For ${a2}, customers can buy the {name}, one of the store's {a1}.",
                "The catalog entry for the {name} gives its category as {a1} and its price as ${a2}.",
                "At a price of ${a2}, the {name} has become a popular pick in {a1}.",
                "In the {a1} section, the {name} carries a tag of ${a2}.",
            ),
            partial=(
                "The {name} appears in the {a1} aisle, but its price has not been announced yet.",
                "A shopper asked about the {name}, which costs ${a2}; no category has been assigned to it yet.",
                "Staff mentioned the {name} in passing without giving any further details.",
            ),
            excluded=(
                "The {name}, a {a1} item once priced at ${a2}, was discontinued and is no longer sold.",
                "Plans for the {name} ({a1}, ${a2}) were cancelled before launch, so it never reached the shelves.",
            ),
        ),
        Domain(
            "medical_professionals",
            "medical professional",
            "medical professionals",
            ("specialty", "city"),
            ("medical specialty", "city where they practice"),
            "has retired",
            "Write names exactly as in the document, without titles such as Dr.",
            _doctor,
            full=(
                "{name} practices {a1} in {a2}.",
                "Patients in {a2} often see {name}, a specialist in {a1}.",
                "Trained in {a1}, {name} now works at a clinic in {a2}.",
                "{name}, whose field is {a1}, has an office in {a2}.",
                "The {a2} medical directory lists {name} under {a1}.",
                "After years of study, {name} opened a {a1} practice in {a2}.",
                "Colleagues in {a2} describe {name} as a dedicated expert in {a1}.",
                "In {a2}, the {a1} service at the main hospital is led by {name}.",
            ),
            partial=(
                "{name} is said to specialise in {a1}, although the city of the practice was not mentioned.",
                "{name} recently moved to {a2}; the specialty was not disclosed.",
                "A newsletter quoted {name} briefly but gave no further details.",
            ),
            excluded=(
                "{name}, formerly a specialist in {a1} in {a2}, has retired and no longer practices.",
                "The retired physician {name} once practiced {a1} in {a2}.",
            ),
        ),
        Domain(
            "organizations",
            "organization",
            "organizations",
            ("industry", "headquarters"),
            ("industry", "headquarters city"),
            "has been dissolved",
            "",
            _organization,
            full=(
                "{name} is a {a1} company headquartered in {a2}.",
                "Based in {a2}, {name} operates in the {a1} sector.",
                "The {a1} firm {name} keeps its head office in {a2}.",
                "{name}, with headquarters in {a2}, has grown steadily in {a1}.",
                "From its headquarters in {a2}, {name} serves clients across the {a1} industry.",
                "Analysts who follow {a1} often mention {name}, which is headquartered in {a2}.",
                "{name} runs its {a1} business out of a head office in {a2}.",
            ),
            partial=(
                "{name} is active in {a1}, but the document gives no details about its head office.",
                "{name} has its headquarters in {a2}; its industry was not specified.",
                "A delegation from {name} attended the meeting without saying much about the company.",
            ),
            excluded=(
                "{name}, a former {a1} company headquartered in {a2}, was dissolved and no longer exists.",
                "The {a1} firm {name} of {a2} has been dissolved.",
            ),
        ),
        Domain(
            "movies",
            "movie",
            "movies",
            ("director", "release_year"),
            ("director", "release year"),
            "was cancelled and never released",
            'Use the movie title as "name" and give "release_year" as four digits.',
            _movie,
            full=(
                "{name}, directed by {a1}, was released in {a2}.",
                "{a1} directed {name}, which came out in {a2}.",
                "Released in {a2}, {name} was the work of director {a1}.",
                "Critics still discuss {name}, the {a2} film by {a1}.",
                "In {a2}, audiences first saw {name}, a film directed by {a1}.",
                "The {a2} release {name} was directed by {a1}.",
                "The film {name} by director {a1} premiered in {a2}.",
            ),
            partial=(
                "{name} is a film by {a1}; its release date is not known.",
                "A film called {name} appeared in {a2}, though its director is not credited here.",
                "Someone recommended {name} without saying anything else about it.",
            ),
            excluded=(
                "{name}, a project by {a1} planned for {a2}, was cancelled and never released.",
                "The film {name}, announced for {a2} with {a1} as director, was cancelled and never released.",
            ),
        ),
    ]
}
