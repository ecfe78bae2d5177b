"""Generate the shipped sample ledger: synthetic accounting rows -> account code.

    python data/sample_ledger/generate.py            # rewrites ledger.parquet and new_vendors/

Two data sets come out of it. `ledger.parquet` (4,000 rows, split by lorasweep) is the demo.
`new_vendors/{train,validation,test}.parquet` is the harder, everyday case of account coding:
validation and test rows come only from vendors that never appear in train (NEW_VENDORS below),
so a model has to read the description, amount and VAT type instead of memorising vendor names.

Deterministic (fixed seed, no wall clock): the committed parquet is exactly what this prints.
The signal lives mostly in `vendor` and `description`; amount, VAT type and payment method help a
little; some rows use generic marketplace vendors or vague descriptions, and 2% of labels are
flipped to a related code in the same account group, so the task is learnable but not trivial.
Account codes follow a 5-digit chart (1xxxx assets, 2xxxx liabilities, 4xxxx revenue, 5xxxx cost
of sales, 8xxxx operating expenses) so prefix roll-ups (hierarchy metrics) mean something.
"""

import random
from pathlib import Path

import pandas as pd

SEED = 20261123
N_ROWS = 4000
OUT = Path(__file__).with_name("ledger.parquet")

# code: (share weight, vendors, description words, (amount low, amount high), vat types)
ACCOUNTS = {
    "81100": (300, ["Staples", "Office Depot", "Alpha Stationery"], ["printer paper", "toner cartridge", "ballpoint pens", "sticky notes", "binders", "stapler"], (5, 300), ["VAT10"]),
    "81200": (220, ["KEPCO", "City Water Works", "Seoul Gas"], ["electricity bill", "water bill", "gas bill", "utility charge"], (80, 2500), ["VAT10"]),
    "81300": (180, ["SK Telecom", "KT Corp", "LG U+"], ["mobile plan", "internet line", "phone bill", "data roaming"], (30, 900), ["VAT10"]),
    "81400": (160, ["Korean Air", "Asiana", "Hotel Shilla", "Lotte Hotel", "KTX Korail"], ["business trip flight", "hotel stay", "train ticket", "travel per diem"], (60, 3000), ["VAT10", "ZERO"]),
    "81500": (150, ["Starbucks", "Paris Baguette", "Outback", "Kyochon"], ["client dinner", "team lunch", "coffee meeting", "catering"], (10, 600), ["VAT10"]),
    "81600": (120, ["Google Ads", "Naver Ads", "Meta Ads", "Kakao Ads"], ["search ads campaign", "display banner", "social media ads", "sponsored post"], (200, 8000), ["VAT10", "ZERO"]),
    "81700": (110, ["AWS", "Microsoft Azure", "Google Cloud"], ["cloud compute", "object storage", "cloud hosting", "managed database"], (100, 12000), ["ZERO", "VAT10"]),
    "81800": (100, ["Adobe", "Atlassian", "Slack", "Notion", "Zoom"], ["software subscription", "saas license", "annual license", "seat renewal"], (20, 3000), ["ZERO", "VAT10"]),
    "81900": (90, ["Regus", "WeWork", "Samsung Realty"], ["office rent", "monthly lease", "coworking desk", "rent deposit top-up"], (1500, 20000), ["VAT10"]),
    "82000": (80, ["Kim & Chang", "Deloitte Anjin", "Samil PwC"], ["legal advice", "audit fee", "tax consulting", "contract review"], (1000, 30000), ["VAT10"]),
    "82100": (70, ["Samsung Fire", "DB Insurance", "Hyundai Marine"], ["liability insurance", "fire insurance premium", "vehicle insurance"], (100, 6000), ["EXEMPT"]),
    "82200": (60, ["SK Energy", "GS Caltex", "S-Oil"], ["fuel", "diesel refill", "gasoline"], (30, 400), ["VAT10"]),
    "82300": (55, ["Hanjin Express", "CJ Logistics", "DHL", "FedEx"], ["parcel delivery", "courier fee", "freight charge", "express shipping"], (5, 1200), ["VAT10", "ZERO"]),
    "82400": (50, ["Fastcampus", "Coursera", "Inflearn"], ["online course", "employee training", "workshop fee", "certification exam"], (50, 2500), ["EXEMPT", "VAT10"]),
    "82500": (45, ["Shinhan Bank", "KB Kookmin", "Woori Bank"], ["wire transfer fee", "bank charge", "fx commission"], (1, 60), ["EXEMPT"]),
    "82600": (40, ["Cleanpro", "S1 Security", "Caps Security"], ["office cleaning", "security service", "pest control"], (200, 3000), ["VAT10"]),
    "82700": (35, ["Red Cross", "UNICEF Korea", "Community Chest"], ["donation", "charity contribution", "sponsorship gift"], (100, 10000), ["EXEMPT"]),
    "51100": (130, ["Posco", "Hyundai Steel", "Dongkuk Steel"], ["steel coil", "raw material", "steel plate", "alloy sheet"], (2000, 50000), ["VAT10"]),
    "51200": (75, ["Samsung SDI", "LG Chem", "Hanwha Solutions"], ["battery cells", "chemical resin", "components batch"], (1000, 40000), ["VAT10", "ZERO"]),
    "51300": (45, ["Daewoo Packaging", "Taerim Paper", "Hansol Paper"], ["cardboard boxes", "packaging film", "shipping pallets"], (100, 5000), ["VAT10"]),
    "14100": (40, ["Apple Store", "Dell", "Lenovo", "Samsung Electronics"], ["laptop purchase", "monitor", "server rack", "workstation"], (800, 15000), ["VAT10"]),
    "14200": (25, ["Fursys", "IKEA", "Hanssem"], ["office desks", "chairs", "meeting table", "shelving"], (300, 9000), ["VAT10"]),
    "25100": (30, ["National Tax Service", "Seoul Metropolitan"], ["vat payment", "withholding tax", "local income tax"], (500, 40000), ["EXEMPT"]),
    "25200": (22, ["National Pension Service", "NHIS"], ["pension contribution", "health insurance contribution"], (500, 20000), ["EXEMPT"]),
    "41100": (35, ["Customer Transfer", "Stripe Payout", "Toss Payments"], ["product sales receipt", "invoice payment received", "customer settlement"], (500, 60000), ["VAT10", "ZERO"]),
    "41200": (18, ["Interest Credit", "Shinhan Bank", "KB Kookmin"], ["deposit interest", "interest income"], (1, 900), ["EXEMPT"]),
}
# Vendors held out of train in new_vendors/: two per code, none of them in ACCOUNTS.
NEW_VENDORS = {
    "81100": ["Paper Planet", "Desk Supply Co"], "81200": ["Incheon Power", "Busan City Gas"],
    "81300": ["Hello Mobile", "SK Broadband"], "81400": ["Jeju Air", "Marriott Seoul"],
    "81500": ["Twosome Place", "Bibigo Kitchen"], "81600": ["TikTok Ads", "Daum Ads"],
    "81700": ["Oracle Cloud", "NHN Cloud"], "81800": ["Figma", "GitHub"],
    "81900": ["Fastfive", "Spark Plus"], "82000": ["Yulchon LLC", "EY Hanyoung"],
    "82100": ["Meritz Fire", "KB Insurance"], "82200": ["Hyundai Oilbank", "E1 Station"],
    "82300": ["Lotte Global Logistics", "UPS"], "82400": ["Udemy", "Class101"],
    "82500": ["Hana Bank", "NH Bank"], "82600": ["ADT Caps", "Cesco"],
    "82700": ["Save the Children", "World Vision"], "51100": ["Seah Steel", "Hyundai BNG Steel"],
    "51200": ["SK On", "Lotte Chemical"], "51300": ["Asia Paper", "Samyang Packaging"],
    "14100": ["HP Store", "Asus"], "14200": ["Sidiz", "Iloom"],
    "25100": ["Gangnam District Office", "Busan Metropolitan"], "25200": ["Employment Insurance",
                                                                          "KCOMWEL"],
    "41100": ["Naver Pay Settlement", "KG Inicis"], "41200": ["Hana Bank", "Interest Payment"],
}
GENERIC_VENDORS = ["Coupang", "Gmarket", "11st", "Amazon", "Naver Pay", "Card Merchant"]
VAGUE_WORDS = ["misc purchase", "payment", "invoice", "monthly charge", "order"]
DEPARTMENTS = ["Finance", "Sales", "R&D", "Operations", "HR", "Marketing", "IT"]
PAYMENTS = ["corporate card", "bank transfer", "auto debit", "cash"]


def make_row(rng: random.Random, code: str, new_vendors: bool = False) -> dict:
    _, vendors, words, (low, high), vat_types = ACCOUNTS[code]
    if new_vendors:
        vendors = NEW_VENDORS[code]
    generic_vendor = rng.random() < 0.25
    vague_description = rng.random() < 0.2
    if generic_vendor and vague_description:  # keep at least one strong field per row
        vague_description = False
    vendor = rng.choice(GENERIC_VENDORS) if generic_vendor else rng.choice(vendors)
    description = rng.choice(VAGUE_WORDS) if vague_description else rng.choice(words)
    if rng.random() < 0.5:
        description += f" {rng.choice(['Q1', 'Q2', 'Q3', 'Q4', 'Jan', 'Mar', 'Jul', 'Oct', '#' + str(rng.randint(100, 999))])}"
    day = rng.randint(0, 364)
    return {
        "date": f"2025-{1 + day // 31 % 12:02d}-{1 + day % 28:02d}",
        "vendor": vendor,
        "description": description,
        "amount": round(rng.uniform(low, high), 2),
        "vat_type": rng.choice(vat_types),
        "payment_method": rng.choice(PAYMENTS),
        "department": rng.choice(DEPARTMENTS),
        "acct_code": code,
    }


def flip_label(rng: random.Random, code: str) -> str:
    """A plausible booking mistake: another code of the same 2-digit group when there is one."""
    siblings = [c for c in ACCOUNTS if c[:2] == code[:2] and c != code]
    return rng.choice(siblings) if siblings else code


def codes_read_from(vendor: str, description: str) -> set:
    """The codes a row's own vendor and description point to (a description keeps its period
    suffix, e.g. "toner cartridge Q3"). A label outside them is one of the flipped labels: no
    reader of the row can recover it, so these rows bound any classifier's score on this data.
    Empty when the vendor is generic and the description vague (make_row never writes one)."""
    from_vendor = {code for code, (_, vendors, *_) in ACCOUNTS.items()
                   if vendor in vendors or vendor in NEW_VENDORS[code]}
    from_words = {code for code, (_, _, words, *_) in ACCOUNTS.items()
                  if any(description == w or description.startswith(w + " ") for w in words)}
    if from_vendor and from_words:
        return from_vendor & from_words
    return from_vendor or from_words


def generate(n_rows: int = N_ROWS, seed: int = SEED, new_vendors: bool = False) -> pd.DataFrame:
    rng = random.Random(seed)
    codes = list(ACCOUNTS)
    weights = [ACCOUNTS[c][0] for c in codes]
    rows = []
    for code in rng.choices(codes, weights=weights, k=n_rows):
        row = make_row(rng, code, new_vendors)
        if rng.random() < 0.02:
            row["acct_code"] = flip_label(rng, code)
        rows.append(row)
    return pd.DataFrame(rows)


def write_new_vendor_splits() -> None:
    """Train from the known vendors; validation and test from NEW_VENDORS only."""
    out = OUT.with_name("new_vendors")
    out.mkdir(exist_ok=True)
    splits = {"train": generate(3200, SEED + 1), "validation": generate(400, SEED + 2, True),
              "test": generate(400, SEED + 3, True)}
    for name, frame in splits.items():
        frame.to_parquet(out / f"{name}.parquet", index=False)
        print(f"wrote {out / name}.parquet ({len(frame)} rows)")


if __name__ == "__main__":
    frame = generate()
    frame.to_parquet(OUT, index=False)
    counts = frame["acct_code"].value_counts()
    print(f"wrote {OUT} ({len(frame)} rows, {counts.size} codes)")
    print(counts.to_string())
    write_new_vendor_splits()
