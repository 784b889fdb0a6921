//! Generated tokens to text as they come: pieces are released only once they are whole
//! characters, and never while they could still be the start of a stop sequence.

use crate::tokenizer::Tokenizer;

/// The answer's text so far, released piece by piece.
pub(crate) struct TextStream {
    tokens: Vec<u32>,
    /// Tokens `prefix..read` were decoded already; decoding from `prefix` keeps the spacing a
    /// tokenizer gives a token after its neighbour.
    prefix: usize,
    read: usize,
    /// Decoded text not yet released (it may be the start of a stop sequence).
    held: String,
    /// The text released so far.
    released: String,
    stops: Vec<String>,
}

/// What one token did to the text.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Piece {
    /// Text to send (possibly empty).
    Text(String),
    /// A stop sequence was reached: the text before it is to be sent, and the answer ends.
    Stopped(String),
}

impl TextStream {
    pub(crate) fn new(stops: Vec<String>) -> Self {
        Self {
            tokens: Vec::new(),
            prefix: 0,
            read: 0,
            held: String::new(),
            released: String::new(),
            stops,
        }
    }

    /// Adds a generated token.
    pub(crate) fn push(&mut self, tok: &Tokenizer, token: u32) -> ape_attn::Result<Piece> {
        self.tokens.push(token);
        let before = tok.decode(&self.tokens[self.prefix..self.read])?;
        let now = tok.decode(&self.tokens[self.prefix..])?;
        // An incomplete UTF-8 sequence decodes as U+FFFD: wait for the token that completes it.
        if now.len() > before.len()
            && !now.ends_with('\u{FFFD}')
            && now.is_char_boundary(before.len())
        {
            self.prefix = self.read;
            self.read = self.tokens.len();
            return Ok(self.push_text(&now[before.len()..]));
        }
        Ok(self.push_text(""))
    }

    /// Adds decoded text and releases what can be released.
    fn push_text(&mut self, text: &str) -> Piece {
        self.held.push_str(text);
        // A stop sequence may straddle what was released and what is held: look from the
        // longest stop's reach back into the released text.
        let reach = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.released.len().saturating_sub(reach);
        while !self.released.is_char_boundary(from) {
            from -= 1;
        }
        let window = format!("{}{}", &self.released[from..], self.held);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| window.find(s.as_str()))
            .min();
        if let Some(at) = hit {
            // Only the held part before the stop goes out (released text already left).
            let cut = (from + at).saturating_sub(self.released.len());
            let mut cut = cut.min(self.held.len());
            while !self.held.is_char_boundary(cut) {
                cut -= 1;
            }
            let out = self.held[..cut].to_string();
            self.released.push_str(&out);
            self.held.clear();
            return Piece::Stopped(out);
        }
        // Hold back the longest end of the text that could still grow into a stop sequence.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&k| s.is_char_boundary(k) && window.ends_with(&s[..k]))
                    .max()
            })
            .max()
            .unwrap_or(0)
            .min(self.held.len());
        let mut split = self.held.len() - keep;
        while !self.held.is_char_boundary(split) {
            split -= 1;
        }
        let out: String = self.held.drain(..split).collect();
        self.released.push_str(&out);
        Piece::Text(out)
    }

    /// What is still held when the answer ends for another reason (its last characters, which
    /// turned out not to start a stop sequence, or an incomplete character).
    pub(crate) fn finish(&mut self, tok: &Tokenizer) -> ape_attn::Result<String> {
        let now = tok.decode(&self.tokens[self.prefix..])?;
        let before = tok.decode(&self.tokens[self.prefix..self.read])?;
        if now.len() > before.len() && now.is_char_boundary(before.len()) {
            self.held.push_str(&now[before.len()..]);
        }
        self.prefix = self.tokens.len();
        self.read = self.tokens.len();
        let out = std::mem::take(&mut self.held);
        self.released.push_str(&out);
        Ok(out)
    }

    /// The whole text released.
    #[cfg(test)]
    pub(crate) fn text(&self) -> &str {
        &self.released
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<Piece>, String) {
        let mut t = TextStream::new(stops.iter().map(|s| s.to_string()).collect());
        let out = pieces.iter().map(|p| t.push_text(p)).collect();
        (out, t.text().to_string())
    }

    #[test]
    fn text_without_stops_goes_out_at_once() {
        let (out, all) = run(&[], &["Hel", "lo", " wörld"]);
        assert_eq!(
            out,
            vec![
                Piece::Text("Hel".into()),
                Piece::Text("lo".into()),
                Piece::Text(" wörld".into())
            ]
        );
        assert_eq!(all, "Hello wörld");
    }

    #[test]
    fn a_possible_stop_is_held_until_it_is_known() {
        let (out, all) = run(&["END"], &["ab", "E", "N", "x"]);
        assert_eq!(
            out,
            vec![
                Piece::Text("ab".into()),
                Piece::Text("".into()),
                Piece::Text("".into()),
                Piece::Text("ENx".into())
            ]
        );
        assert_eq!(all, "abENx");
    }

    #[test]
    fn a_stop_ends_the_text_before_it_even_across_pieces() {
        let (out, all) = run(&["END"], &["ab", "E", "ND and more"]);
        assert_eq!(out.last(), Some(&Piece::Stopped("".into())));
        assert_eq!(all, "ab");
        let (out, all) = run(&["\n\n", "END"], &["one\n", "\ntwo"]);
        assert_eq!(
            out,
            vec![Piece::Text("one".into()), Piece::Stopped("".into())]
        );
        assert_eq!(all, "one");
        let (_, all) = run(&["é!"], &["caf", "é", "!"]);
        assert_eq!(all, "caf");
    }
}
