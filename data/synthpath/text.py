"""SynthPath text: captions, textbook paragraphs, questions and chains of thought.

Everything here is a pure function of (rng, class, attributes), so the same seed gives the
same text. The facts stated are exactly the attributes the renderer drew (world.py), so a
caption, a question's answer and a chain of thought are all checkable against the pixels.
Usage (prepare.py does this for every image):

    caption(rng, "TUM", attrs)                 # one varied caption
    findings_caption(rng, attrs)               # a tumour's findings by level word (stage 1's extra captions)
    q = ask(rng, "mitoses", "short", "TUM", attrs)   # {"question", "options", "answer", "kind", "steps"}
    chain(q, "long")                           # the <think> text reasoning over visible attributes
"""

from data.synthpath.world import CLASSES, sample_attributes

# canonical name (the short answer), synonyms (captions, zero-shot prompts), description paraphrases
CLASS_INFO = {
    "ADI": ("adipose tissue", ["adipose tissue", "adipose", "fat", "fat tissue", "adipocytes"], [
        "large empty polygonal fat cells separated by thin pink membranes, with a few flattened nuclei pressed to the cell edges",
        "big clear vacuoles outlined by delicate eosinophilic membranes and only rare compressed nuclei",
        "a honeycomb of large optically empty adipocytes with thin septa"]),
    "BACK": ("background", ["background", "slide background", "empty slide", "glass background", "no tissue"], [
        "an empty area of the glass slide without cells, at most faint haze, dust or a torn tissue edge",
        "bare glass with no nuclei and no organised tissue, sometimes a few floaters or fibrin strands",
        "a blank field of the slide where no tissue is present"]),
    "DEB": ("debris", ["debris", "necrotic debris", "necrosis", "cellular debris", "necrotic tissue"], [
        "granular pink necrotic material with scattered nuclear dust, pyknotic nuclei and pale ghost cells",
        "amorphous eosinophilic debris containing fragmented dark nuclear particles (karyorrhexis) and no viable cells",
        "dead tissue: smudged pink material, ghost outlines of cells and many tiny dark nuclear fragments"]),
    "LYM": ("lymphocytes", ["lymphocytes", "lymphocytic infiltrate", "lymphoid aggregate", "immune cells", "lymphoid tissue"], [
        "densely packed small round dark nuclei with scant cytoplasm",
        "sheets of small uniform lymphocytes whose round hyperchromatic nuclei almost touch",
        "a crowded population of small round blue-black nuclei with very little cytoplasm"]),
    "MUC": ("mucus", ["mucus", "mucin", "extracellular mucin", "mucinous material", "mucin pool"], [
        "pale bluish-grey mucin with thin wispy strands and very few cells",
        "a pool of faint basophilic mucus with delicate streaming strands and scattered floating cells",
        "lightly stained extracellular mucin forming wisps and lakes with almost no nuclei"]),
    "MUS": ("smooth muscle", ["smooth muscle", "muscularis propria", "smooth muscle fibers", "muscle tissue", "smooth muscle bundles"], [
        "dense pink fascicles of smooth muscle fibres with long blunt-ended cigar-shaped nuclei aligned with the fibres",
        "bundles of strongly eosinophilic spindle cells whose elongated nuclei run parallel in one direction",
        "compact eosinophilic muscle fascicles with evenly spaced cigar-shaped nuclei"]),
    "NORM": ("normal colonic mucosa", ["normal colonic mucosa", "normal colon mucosa", "benign colonic mucosa", "normal colonic epithelium", "normal mucosa"], [
        "round regular crypts lined by a single layer of small basal nuclei, many goblet cells and a lamina propria with scattered lymphocytes",
        "evenly spaced crypts with abundant clear goblet-cell vacuoles and small uniform nuclei at the base of the epithelium",
        "benign crypts in cross-section: one orderly layer of small nuclei, goblet cells and loose lamina propria between crypts"]),
    "STR": ("cancer-associated stroma", ["cancer-associated stroma", "tumor stroma", "desmoplastic stroma", "stroma", "tumour stroma"], [
        "loose wavy pink collagen bundles with sparse thin spindle-shaped fibroblast nuclei",
        "desmoplastic connective tissue: wavy eosinophilic fibres, pale gaps between them and few slender nuclei",
        "fibrous stroma made of undulating collagen with scattered thin fibroblasts and an occasional lymphocyte"]),
    "TUM": ("adenocarcinoma epithelium", ["adenocarcinoma epithelium", "colorectal adenocarcinoma", "tumor epithelium", "colorectal cancer", "adenocarcinoma", "tumour epithelium"], [
        "crowded atypical epithelium with enlarged pleomorphic nuclei forming irregular glands or solid sheets",
        "malignant glandular epithelium: stratified, enlarged, hyperchromatic nuclei lining distorted glands or growing in sheets",
        "disorganised tumour cells with large irregular nuclei arranged in complex glands, cribriform nests or solid areas"]),
}

NAME = {c: CLASS_INFO[c][0] for c in CLASSES}

DENSITY = {"low": ["sparse nuclei", "low nuclear density"], "moderate": ["moderately dense nuclei", "moderate nuclear density"],
           "high": ["crowded nuclei", "high nuclear density"]}
SIZE = {"small": ["small nuclei", "nuclei of small size"], "medium": ["medium-sized nuclei", "moderately enlarged nuclei"],
        "large": ["large nuclei", "markedly enlarged nuclei"]}
PLEO = {"mild": ["mild nuclear pleomorphism", "fairly uniform nuclei"],
        "moderate": ["moderate nuclear pleomorphism", "nuclei of moderately variable size and shape"],
        "marked": ["marked nuclear pleomorphism", "nuclei that vary greatly in size and shape"]}
GLANDS = {"good": ["well-formed glands", "tubular glands with open lumens"],
          "moderate": ["irregular, partly cribriform glands", "moderately formed, angulated and fused glands"],
          "poor": ["poor gland formation with solid sheets", "solid sheets with no gland lumens"]}
GRADE_RULE = ("an adenocarcinoma is high grade if gland formation is poor (solid sheets), or nuclear pleomorphism is "
              "marked, or there are 3 or more mitotic figures in the tile; otherwise it is low grade")
NUMBERS = ["no", "one", "two", "three", "four"]


def pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def mitoses_phrase(n):
    return "no mitotic figures" if n == 0 else f"{NUMBERS[n]} mitotic figure{'s' if n > 1 else ''}"


def tumour_facts(rng, attrs):
    """Phrases for every tumour attribute, in random order."""
    facts = [pick(rng, GLANDS[attrs["gland_formation"]]), pick(rng, PLEO[attrs["pleomorphism"]]),
             pick(rng, SIZE[attrs["nuclear_size"]]), pick(rng, DENSITY[attrs["nuclear_density"]]),
             mitoses_phrase(attrs["mitoses"]),
             "dirty necrosis" if attrs["necrosis"] else "no necrosis",
             "extracellular mucin" if attrs["mucin"] else "no extracellular mucin"]
    return [facts[i] for i in rng.permutation(len(facts))]


def join(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# -----------------------------------------------------------------------------
# captions

INTROS = ["H&E image of {}.", "H&E-stained section showing {}.", "Photomicrograph of {}.", "Histology tile of {}.",
          "A tile of {}.", "Microscopic view of {}.", "This H&E patch shows {}.", "{} at high power, H&E stain."]


def caption(rng, cls, attrs, detailed=False):
    """A varied caption; detailed=True states every attribute (retrieval captions)."""
    syn = pick(rng, CLASS_INFO[cls][1])
    if cls == "TUM":
        syn = f"{attrs['grade']}-grade {syn}"
    intro = pick(rng, INTROS).format(syn)
    intro = intro[0].upper() + intro[1:]
    if cls != "TUM":
        return f"{intro} {pick(rng, CLASS_INFO[cls][2]).capitalize()}."
    facts = tumour_facts(rng, attrs)
    n = len(facts) if detailed else int(rng.integers(2, 5))
    return f"{intro} {pick(rng, ['It shows', 'Note', 'Findings:', 'Features:'])} {join(facts[:n])}."


def findings_caption(rng, attrs):
    """A tumour caption that names every graded finding by the level word the questions and chains
    use ("gland formation is poor", "pleomorphism is marked", "mitotic count is 2"), findings in
    random order, then the grade. Stage 1 reads these so the LM learns to say what the image shows
    in the words SFT's chains conclude with; the ordinary captions paraphrase the levels instead."""
    facts = [f"gland formation is {attrs['gland_formation']}", f"pleomorphism is {attrs['pleomorphism']}",
             f"mitotic count is {attrs['mitoses']}", f"necrosis is {'present' if attrs['necrosis'] else 'absent'}",
             f"mucin is {'present' if attrs['mucin'] else 'absent'}"]
    facts = [facts[i] for i in rng.permutation(len(facts))]
    intro = pick(rng, ["Adenocarcinoma findings:", "Tumour findings:", "Findings in this adenocarcinoma:"])
    return f"{intro} {join(facts)}; {attrs['grade']} grade."


# -----------------------------------------------------------------------------
# textbook

def textbook(rng, n_examples):
    """Paragraphs stating the world's rules, then worked grading examples."""
    out = []
    for c in CLASSES:
        name, syns, descs = CLASS_INFO[c]
        for d in descs:
            out.append(f"{name.capitalize()} (also called {join(syns[1:])}) appears on H&E as {d}.")
    for phrasing in [f"Grading rule: {GRADE_RULE}.",
                     f"How to grade a colorectal adenocarcinoma in this atlas: {GRADE_RULE}. Check the glands, the nuclei and the mitotic count in turn.",
                     "A tumour with well-formed or moderately formed glands, mild or moderate pleomorphism and at most 2 mitotic figures is low grade. Any one of poor gland formation, marked pleomorphism or 3 or more mitoses makes it high grade.",
                     "High-grade adenocarcinoma grows in solid sheets, or has markedly pleomorphic nuclei, or shows many (3 or more) mitoses. Low-grade adenocarcinoma keeps recognisable glands, has no more than moderate pleomorphism and shows 0 to 2 mitoses."]:
        out.append(phrasing)
    out += [
        "Hematoxylin stains nuclei and mucin blue-purple; eosin stains cytoplasm, collagen, muscle and necrotic debris pink. Colour intensity varies between slides, so judge tissue by shape and arrangement, not by colour alone.",
        "The optical density of a stained pixel is the sum of the hematoxylin and eosin densities; transmitted light falls exponentially with optical density (Beer-Lambert law).",
        "A mitotic figure is a dividing cell: its chromatin is condensed into a near-black bar (metaphase), two parallel bars (anaphase) or a ragged clump, usually surrounded by a clear halo. Count each such figure once.",
        "Nuclear pleomorphism is variation of nuclear size and shape: mild when nuclei look alike, moderate when they vary noticeably, marked when some nuclei are several times larger than others with irregular outlines.",
        "Gland formation in adenocarcinoma: good when most tumour cells line tubular glands with open lumens; moderate when glands are irregular, fused or cribriform; poor when tumour cells grow in solid sheets without lumens.",
        "Dirty necrosis is pink granular debris with nuclear dust inside tumour glands or sheets; it is typical of colorectal adenocarcinoma.",
        "Extracellular mucin appears as pale bluish-grey lakes with wispy strands; goblet cells of normal mucosa hold mucin inside the cell instead.",
        "Lymphocytes are small (about 7 um) round cells with dark nuclei and almost no cytoplasm; tumour nuclei are larger, paler inside, and irregular.",
        "Smooth muscle nuclei are cigar-shaped with blunt ends and lie parallel in fascicles; fibroblasts of stroma are thinner, wavier and sparser.",
        "Adipose tissue and background are both mostly empty: adipose shows a network of thin membranes around large cells, background shows no cell outlines at all.",
    ]
    for _ in range(n_examples):
        out.append(worked_example(rng))
    return out


def worked_example(rng):
    attrs = sample_attributes(rng, "TUM")
    reasons = grade_reasons(attrs)
    because = join(reasons) if reasons else "none of the high-grade criteria is met"
    facts = [f for f in tumour_facts(rng, attrs) if "mitotic" not in f][:3] + [mitoses_phrase(attrs["mitoses"])]
    return (f"Example: an adenocarcinoma with {join(facts)}. "
            f"It is {attrs['grade']} grade because {because}.")


def grade_reasons(attrs):
    r = []
    if attrs["gland_formation"] == "poor":
        r.append("gland formation is poor")
    if attrs["pleomorphism"] == "marked":
        r.append("pleomorphism is marked")
    if attrs["mitoses"] >= 3:
        r.append(f"there are {attrs['mitoses']} mitotic figures (3 or more)")
    return r


# -----------------------------------------------------------------------------
# questions: every answer is a visible attribute; steps are the chain-of-thought facts

LETTERS = "ABCD"
QUESTION_TYPES = {  # type -> (classes it is asked about, kinds it supports)
    "tissue": (CLASSES, ("mcq", "short", "yesno")),
    "grade": (("TUM",), ("mcq", "short", "yesno")),
    "mitoses": (("TUM",), ("mcq", "short", "yesno")),
    "glands": (("TUM",), ("mcq", "short", "yesno")),
    "pleomorphism": (("TUM",), ("mcq", "short")),
    "necrosis": (("TUM",), ("yesno",)),
    "mucin": (("TUM",), ("yesno",)),
}


def observations(rng, cls, attrs):
    """Chain-of-thought facts: the class step, then one step per visible tumour attribute."""
    obs = {"tissue": f"The tile shows {pick(rng, CLASS_INFO[cls][2])}, which is {NAME[cls]}."}
    if cls != "TUM":
        return obs
    n = attrs["mitoses"]
    obs["glands"] = f"Gland formation: {pick(rng, GLANDS[attrs['gland_formation']])}, so it is {attrs['gland_formation']}."
    obs["pleomorphism"] = (f"The nuclei are {attrs['nuclear_size']} and {attrs['nuclear_density']} in density, with "
                           f"{pick(rng, PLEO[attrs['pleomorphism']])}: pleomorphism is {attrs['pleomorphism']}.")
    obs["mitoses"] = ("I see no near-black condensed mitotic figures." if n == 0 else
                      f"I count {NUMBERS[n]} near-black condensed mitotic figure{'s' if n > 1 else ''} with clear halos, so {n}.")
    obs["necrosis"] = ("There is pink granular debris with nuclear dust: dirty necrosis is present." if attrs["necrosis"]
                       else "There is no granular debris or nuclear dust, so no necrosis.")
    obs["mucin"] = ("There are pale bluish lakes with wispy strands: extracellular mucin is present." if attrs["mucin"]
                    else "There are no pale bluish mucin lakes, so no extracellular mucin.")
    reasons = grade_reasons(attrs)
    obs["grade"] = (f"Rule: {GRADE_RULE}. Here {join(reasons)}, so it is high grade." if reasons else
                    f"Rule: {GRADE_RULE}. Here none of the criteria is met, so it is low grade.")
    return obs


def _options(rng, correct, distractors, pos):
    """Four lettered options with the correct one at position pos -> (options, letter)."""
    others = [distractors[i] for i in rng.permutation(len(distractors))[:3]]
    opts = others[:pos] + [correct] + others[pos:]
    return [f"{LETTERS[i]}) {o}" for i, o in enumerate(opts)], LETTERS[pos]


def _yesno_tissue(rng, cls, target):
    other = pick(rng, [c for c in CLASSES if c != cls])
    asked = cls if target == "yes" else other
    term = pick(rng, CLASS_INFO[asked][1])
    about = term if term == NAME[asked] else f"{term}, that is {NAME[asked]}"
    return f"Does this tile show {term}?", target, about


def _yesno(rng, qtype, cls, attrs, target):
    """(question, answer, what the question asks about or None) of a yes/no question, aiming for
    answer == target when possible. The chain restates `about` right before deciding, so the
    decision compares two names in adjacent sentences (tissue: the canonical name of the term asked)."""
    if qtype == "tissue":
        return _yesno_tissue(rng, cls, target)
    if qtype == "grade":
        g = attrs["grade"] if target == "yes" else ("low" if attrs["grade"] == "high" else "high")
        return f"Is this adenocarcinoma {g} grade?", "yes" if g == attrs["grade"] else "no", f"{g} grade"
    if qtype == "mitoses":
        n = attrs["mitoses"]
        if (target == "yes" and n >= 1) or n == 4:
            k = int(rng.integers(1, n + 1))
        else:
            k = int(rng.integers(n + 1, 5))
        q = "Are any mitotic figures visible?" if k == 1 else f"Are at least {NUMBERS[k]} mitotic figures visible?"
        return q, "yes" if n >= k else "no", f"at least {k}"
    if qtype == "glands":
        return "Does the tumour form glands with open lumens?", "yes" if attrs["glands"] else "no", None
    if qtype == "necrosis":
        return pick(rng, ["Is tumour necrosis present?", "Is there dirty necrosis in this tile?"]), "yes" if attrs["necrosis"] else "no", None
    return pick(rng, ["Is extracellular mucin present?", "Are there pools of mucin?"]), "yes" if attrs["mucin"] else "no", None


def grade_option(grade, necrosis):
    """The grade MCQ's option text: two findings in one, "high grade, without necrosis"."""
    return f"{grade} grade, {'with' if necrosis else 'without'} necrosis"


# the tumour MCQs' option texts; each question's options are its right one and the others of its table
GRADE_OPTIONS = [grade_option(g, n) for g in ("low", "high") for n in (False, True)]
COUNT_OPTIONS = [str(i) for i in range(5)]
GLAND_OPTIONS = {"good": "well-formed glands", "moderate": "moderately formed, irregular glands",
                 "poor": "poorly formed, solid sheets", None: "no epithelium present"}
PLEO_OPTIONS = {"mild": "mild pleomorphism", "moderate": "moderate pleomorphism", "marked": "marked pleomorphism",
                None: "no nuclei present"}


def attribute_options():
    """Every option text of the tumour MCQs (grade, mitoses, glands, pleomorphism): the words stage 0's
    reading rows must hold, so the base LM can copy them (data/synthpath/reading.py)."""
    return GRADE_OPTIONS + COUNT_OPTIONS + list(GLAND_OPTIONS.values()) + list(PLEO_OPTIONS.values())


def _mcq(rng, qtype, cls, attrs, pos):
    if qtype == "tissue":
        q = pick(rng, ["Which tissue type is shown in this image?", "What does this H&E tile show?", "Identify the tissue in this tile."])
        return (q,) + _options(rng, NAME[cls], [NAME[c] for c in CLASSES if c != cls], pos)
    q, right, table = {
        "grade": ("Which statement describes this adenocarcinoma?", grade_option(attrs["grade"], attrs["necrosis"]),
                  GRADE_OPTIONS),
        "mitoses": ("How many mitotic figures are visible in this tile?", str(attrs["mitoses"]), COUNT_OPTIONS),
        "glands": ("How well does this tumour form glands?", GLAND_OPTIONS[attrs["gland_formation"]],
                   list(GLAND_OPTIONS.values())),
        "pleomorphism": ("How pleomorphic are the tumour nuclei?", PLEO_OPTIONS[attrs["pleomorphism"]],
                         list(PLEO_OPTIONS.values())),
    }[qtype]
    return (q,) + _options(rng, right, [o for o in table if o != right], pos)


SHORT = {
    "tissue": ("What type of tissue is shown? Answer with the tissue name.", lambda c, a: NAME[c]),
    "grade": ("What is the grade of this adenocarcinoma? Answer low or high.", lambda c, a: a["grade"]),
    "mitoses": ("How many mitotic figures are visible? Answer with a number.", lambda c, a: str(a["mitoses"])),
    "glands": ("How well does this tumour form glands? Answer good, moderate or poor.", lambda c, a: a["gland_formation"]),
    "pleomorphism": ("How pleomorphic are the tumour nuclei? Answer mild, moderate or marked.", lambda c, a: a["pleomorphism"]),
}


def ask(rng, qtype, kind, cls, attrs, target="yes", pos=0):
    """One question -> {"question", "options", "answer", "kind", "type"}.
    mcq: answer is a letter, the correct option at position pos; yesno: aims at answer target."""
    assert cls in QUESTION_TYPES[qtype][0] and kind in QUESTION_TYPES[qtype][1], (qtype, kind, cls)
    about = None
    if kind == "mcq":
        q, options, answer = _mcq(rng, qtype, cls, attrs, pos)
    elif kind == "yesno":
        (q, answer, about), options = _yesno(rng, qtype, cls, attrs, target), None
        q += " Answer yes or no."
    else:
        q, options, answer = SHORT[qtype][0], None, SHORT[qtype][1](cls, attrs)
    return {"question": q, "options": options, "answer": answer, "kind": kind, "type": qtype, "about": about}


def chain(rng, q, cls, attrs, length):
    """<think> text for question q: short = the decisive fact, medium = tissue + decisive fact,
    long = tissue + every visible attribute + the decisive fact (grade rule for grade questions);
    then a closing that states the answer (MCQ: walk_options; for a yes/no question about a name,
    "The question asks about fat, that is adipose tissue." first)."""
    obs = observations(rng, cls, attrs)
    key = obs[q["type"]]
    if length == "short" or (q["type"] == "tissue" and length == "medium"):
        steps = [key]
    elif length == "medium":
        steps = [obs["tissue"], key]
    elif cls != "TUM":
        steps = [key, _contrast(rng, cls)]
    elif q["type"] == "tissue":
        steps = [key, obs["glands"], obs["pleomorphism"]]
    else:   # long: tissue, every other visible attribute, then the decisive one (grade: the rule last)
        steps = [obs[k] for k in obs if k not in (q["type"], "grade")] + [key]
    if q["kind"] == "mcq":
        steps.append(walk_options(q["options"], q["answer"]))
    else:  # close on the answer itself, so <answer> copies the sentence before it, not a distant question
        if q.get("about"):  # restate what is asked next to what is seen: the decision compares adjacent names
            steps.append(f"The question asks about {q['about']}.")
        steps.append(f"So the answer is {q['answer']}.")
    return " ".join(steps)


def walk_options(options, answer):
    """The MCQ closing: check the options in order against the finding just stated, stop at the one
    that matches, then name its letter:

        Checking the options:
        A) lymphocytes: no.
        B) mucus: yes.
        So the answer is B.

    Every step is local for a small LM: a line copies the prompt's option line (plain induction: the
    same tokens follow "B)" there), its yes/no compares two names a few tokens apart, and the letter
    is the current line's. "This matches option B) mucus." asked for the letter in front of a name
    somewhere in the prompt instead (a content-addressed look-up), which the toy LM never learned."""
    lines = []
    for option in options:
        match = option.startswith(answer + ")")
        lines.append(f"{option}: {'yes' if match else 'no'}.")
        if match:
            break
    return "Checking the options:\n" + "\n".join(lines) + f"\nSo the answer is {answer}."


def _contrast(rng, cls):
    """A differential-diagnosis sentence for long chains on non-tumour tiles."""
    other = pick(rng, [c for c in CLASSES if c != cls])
    return f"It is not {NAME[other]}, which would show {pick(rng, CLASS_INFO[other][2])}."


def description_chain(rng, cls, attrs, length):
    obs = observations(rng, cls, attrs)
    steps = list(obs.values())
    keep = {"short": 1, "medium": 3, "long": len(steps)}[length]
    return " ".join(steps[:keep])
