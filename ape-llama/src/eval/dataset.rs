//! A seeded, generated multi-document question-answering set about fictional entities, so that a
//! model cannot answer from memory: names and towns are built from syllables, and every fact is
//! made up. Each example has one relevant document and distractors of the same form (the same
//! relation about other entities, with other answers), and candidate answers drawn from the
//! distractors' answers, so that answering needs the right document.

/// One question over `documents`, the relevant one at `relevant`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// The documents, in order.
    pub documents: Vec<String>,
    /// Index of the document that answers the question.
    pub relevant: usize,
    /// The question.
    pub question: String,
    /// The correct answer.
    pub answer: String,
    /// Candidate answers, the correct one included (at `answer_index`).
    pub candidates: Vec<String>,
    /// Where the correct answer is among the candidates.
    pub answer_index: usize,
    /// The relation asked about (for reporting).
    pub relation: &'static str,
}

use ape_attn::{Error, Result};

/// A small deterministic generator (xorshift64*).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x2545_f491_4f6c_dd1d | 1)
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) % n as u64) as usize
    }

    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len())]
    }
}

const FIRST: &[&str] = &[
    "Mira", "Tomas", "Elsa", "Ivo", "Lena", "Oren", "Petra", "Ravi", "Sana", "Yuri", "Aino",
    "Bram", "Cleo", "Dov", "Esme", "Finn", "Greta", "Hugo", "Ines", "Joran",
];
const SYLLABLES: &[&str] = &[
    "kov", "dar", "vel", "mor", "tas", "lin", "bre", "quo", "zan", "fel", "rud", "oss", "pim",
    "gal", "ster", "wen", "tor", "ash", "nev", "cul",
];
const TOWN_END: &[&str] = &[
    "hill", "by", "ford", "mere", "wick", "stead", "holm", "gate",
];
const ORG_ADJ: &[&str] = &[
    "Lantern", "Copper", "Silver", "Hollow", "Amber", "Crooked", "Quiet", "Iron", "Velvet",
    "Northern",
];
const ORG_NOUN: &[&str] = &[
    "Kettle", "Anchor", "Owl", "Harbor", "Mill", "Compass", "Pine", "Bell",
];
const ORG_KIND: &[&str] = &[
    "Bakery",
    "Press",
    "Observatory",
    "Guild",
    "Theatre",
    "Brewery",
    "Library",
];
const JOBS: &[&str] = &[
    "glassblower",
    "cartographer",
    "beekeeper",
    "clockmaker",
    "ferry pilot",
    "bookbinder",
    "stonemason",
    "lighthouse keeper",
    "violin maker",
    "archivist",
    "potter",
    "weaver",
    "sailmaker",
    "goldsmith",
];
const COLOURS: &[&str] = &[
    "green",
    "orange",
    "purple",
    "yellow",
    "crimson",
    "teal",
    "grey",
    "violet",
    "indigo",
    "amber",
    "scarlet",
    "turquoise",
    "maroon",
    "olive",
];

fn surname(r: &mut Rng) -> String {
    let mut s = String::new();
    for _ in 0..2 + r.below(2) {
        s.push_str(r.pick(SYLLABLES));
    }
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

fn person(r: &mut Rng) -> String {
    format!("{} {}", r.pick(FIRST), surname(r))
}

fn town(r: &mut Rng) -> String {
    format!("{}{}", surname(r), r.pick(TOWN_END))
}

fn org(r: &mut Rng) -> String {
    format!(
        "the {} {} {}",
        r.pick(ORG_ADJ),
        r.pick(ORG_NOUN),
        r.pick(ORG_KIND)
    )
}

fn year(r: &mut Rng) -> String {
    (1850 + r.below(170)).to_string()
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

/// A relation: makes (subject, answer), the document stating it, and the question asking it.
struct Relation {
    name: &'static str,
    subject: fn(&mut Rng) -> String,
    answer: fn(&mut Rng) -> String,
    document: fn(&str, &str) -> String,
    question: fn(&str) -> String,
}

const RELATIONS: &[Relation] = &[
    Relation {
        name: "founder",
        subject: org,
        answer: person,
        document: |s, a| {
            format!(
                "{} was founded by {a}, who still runs it today.",
                capitalize(s)
            )
        },
        question: |s| format!("Who founded {s}?"),
    },
    Relation {
        name: "birthplace",
        subject: person,
        answer: town,
        document: |s, a| format!("{s} was born in the town of {a} and grew up by the river there."),
        question: |s| format!("In which town was {s} born?"),
    },
    Relation {
        name: "profession",
        subject: person,
        answer: |r| r.pick(JOBS).to_string(),
        document: |s, a| format!("{s} works as a {a} and is well known in the region."),
        question: |s| format!("What does {s} work as?"),
    },
    Relation {
        name: "year",
        subject: org,
        answer: year,
        document: |s, a| format!("{} opened its doors to the public in {a}.", capitalize(s)),
        question: |s| format!("In which year did {s} open?"),
    },
    Relation {
        name: "flag",
        subject: town,
        answer: |r| r.pick(COLOURS).to_string(),
        document: |s, a| format!("The flag of {s} is {a} with a white star in the corner."),
        question: |s| format!("What colour is the flag of {s}?"),
    },
];

/// Draws `n` values with `f` that are all different from each other and from `avoid`.
fn distinct(r: &mut Rng, n: usize, avoid: &[String], f: fn(&mut Rng) -> String) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(n);
    let mut tries = 0;
    while out.len() < n && tries < 10_000 {
        tries += 1;
        let v = f(r);
        if !avoid.contains(&v) && !out.contains(&v) {
            out.push(v);
        }
    }
    out
}

/// The most documents per example, and candidates per question, [`generate`] takes.
pub const MAX_DOCS: usize = 100;
/// See [`MAX_DOCS`].
pub const MAX_CANDIDATES: usize = 100;

/// One example with `n_docs` documents, the relevant one at `relevant`, and up to
/// `n_candidates` candidate answers; `None` when no relation drew enough distinct values (only
/// for counts past [`MAX_DOCS`] or [`MAX_CANDIDATES`]).
pub fn example(
    r: &mut Rng,
    n_docs: usize,
    relevant: usize,
    n_candidates: usize,
) -> Option<Example> {
    // A relation whose pools give enough distinct subjects and answers (the fixed lists hold 14;
    // generated names and years give thousands, so the founder relation qualifies up to the
    // limits). Bounded: past them, no relation may ever qualify.
    let (rel, subjects, answers) = (0..1000).find_map(|_| {
        let rel = &RELATIONS[r.below(RELATIONS.len())];
        let subjects = distinct(r, n_docs.max(1), &[], rel.subject);
        let answers = distinct(r, n_docs.max(n_candidates).max(1), &[], rel.answer);
        (subjects.len() >= n_docs.max(1) && answers.len() >= n_docs.max(n_candidates).max(1))
            .then_some((rel, subjects, answers))
    })?;
    let relevant = relevant.min(n_docs.saturating_sub(1));
    // Document i states subject i's answer i; the question asks about the relevant subject.
    let documents: Vec<String> = (0..n_docs)
        .map(|i| (rel.document)(&subjects[i], &answers[i]))
        .collect();
    let answer = answers[relevant].clone();
    // Candidates: the gold answer, the distractors' answers first, then unused values.
    let mut others: Vec<String> = (0..answers.len())
        .filter(|&i| i != relevant)
        .map(|i| answers[i].clone())
        .collect();
    others.truncate(n_candidates.saturating_sub(1));
    let answer_index = r.below(others.len() + 1);
    let mut candidates = others;
    candidates.insert(answer_index, answer.clone());
    Some(Example {
        documents,
        relevant,
        question: (rel.question)(&subjects[relevant]),
        answer,
        candidates,
        answer_index,
        relation: rel.name,
    })
}

/// The evaluation set: for each document count, `per_position` examples with the relevant
/// document at each position.
///
/// Errors unless every document count is at most [`MAX_DOCS`] and `n_candidates` is in
/// `2..=`[`MAX_CANDIDATES`] (one candidate would make every answer right).
pub fn generate(
    seed: u64,
    doc_counts: &[usize],
    per_position: usize,
    n_candidates: usize,
) -> Result<Vec<Example>> {
    if let Some(n) = doc_counts.iter().find(|&&n| n > MAX_DOCS) {
        return Err(Error::OutOfRange(format!(
            "{n} documents per example: at most {MAX_DOCS}"
        )));
    }
    if !(2..=MAX_CANDIDATES).contains(&n_candidates) {
        return Err(Error::OutOfRange(format!(
            "{n_candidates} candidates per question: 2 to {MAX_CANDIDATES}"
        )));
    }
    let mut r = Rng::new(seed);
    let mut out = Vec::new();
    for &n in doc_counts {
        for pos in 0..n {
            for _ in 0..per_position {
                out.push(example(&mut r, n, pos, n_candidates).ok_or_else(|| {
                    Error::OutOfRange(format!(
                        "no relation gives {n} distinct subjects and {n_candidates} answers"
                    ))
                })?);
            }
        }
    }
    Ok(out)
}
