//! Glob-style patterns as Redis's `KEYS` and `CONFIG GET` understand them
//! (`stringmatchlen`): `*` any run of bytes, `?` any one byte, `[abc]`,
//! `[^abc]`, `[a-z]` one byte of (or not of) a set, and `\x` the byte `x`
//! itself. Bytes, not characters; case-sensitive unless asked otherwise.
//! One deliberate difference: `*` also matches the empty string (Redis's
//! matcher says no, though its `KEYS *` lists the empty key all the same).
//!
//! The matcher backtracks only to the last `*`, so it runs in
//! O(pattern × subject) time even for patterns like `*a*a*a*a*b`: a client
//! cannot stall the (single-threaded) server with one `KEYS` call.

/// Whether `subject` matches `pattern`, comparing ASCII letters
/// case-insensitively if `nocase`.
pub fn matches(pattern: &[u8], subject: &[u8], nocase: bool) -> bool {
    let (mut p, mut s) = (0, 0);
    // Where to resume after the last `*`: pattern index after it, and the
    // subject index it will next try to cover up to.
    let mut star: Option<(usize, usize)> = None;
    loop {
        if p < pattern.len() {
            if pattern[p] == b'*' {
                // Runs of `*` are one `*`.
                while p < pattern.len() && pattern[p] == b'*' {
                    p += 1;
                }
                if p == pattern.len() {
                    return true;
                }
                star = Some((p, s));
                continue;
            }
            if s < subject.len() {
                if let Some(next) = match_one(pattern, p, subject[s], nocase) {
                    p = next;
                    s += 1;
                    continue;
                }
            }
        } else if s == subject.len() {
            return true;
        }
        // Mismatch: let the last `*` swallow one more byte and retry.
        match star {
            Some((after_star, covered)) if covered < subject.len() => {
                star = Some((after_star, covered + 1));
                p = after_star;
                s = covered + 1;
            }
            _ => return false,
        }
    }
}

/// Matches the single-byte element of `pattern` at `p` (not `*`) against
/// `c`: the index after that element if it matches.
fn match_one(pattern: &[u8], p: usize, c: u8, nocase: bool) -> Option<usize> {
    let eq = |a: u8, b: u8| {
        if nocase {
            a.eq_ignore_ascii_case(&b)
        } else {
            a == b
        }
    };
    match pattern[p] {
        b'?' => Some(p + 1),
        b'[' => {
            let mut i = p + 1;
            let negate = pattern.get(i) == Some(&b'^');
            if negate {
                i += 1;
            }
            let mut hit = false;
            // An unterminated set ends with the pattern (as in Redis).
            while i < pattern.len() && pattern[i] != b']' {
                if pattern[i] == b'\\' && i + 1 < pattern.len() {
                    // Case-sensitive even with `nocase`, as in Redis.
                    hit |= pattern[i + 1] == c;
                    i += 2;
                } else if i + 2 < pattern.len() && pattern[i + 1] == b'-' {
                    let (mut lo, mut hi) = (pattern[i], pattern[i + 2]);
                    if lo > hi {
                        core::mem::swap(&mut lo, &mut hi);
                    }
                    let x = if nocase { c.to_ascii_lowercase() } else { c };
                    let (lo, hi) = if nocase {
                        (lo.to_ascii_lowercase(), hi.to_ascii_lowercase())
                    } else {
                        (lo, hi)
                    };
                    hit |= lo <= x && x <= hi;
                    i += 3;
                } else {
                    hit |= eq(pattern[i], c);
                    i += 1;
                }
            }
            let next = (i + 1).min(pattern.len());
            (hit != negate).then_some(next)
        }
        b'\\' if p + 1 < pattern.len() => eq(pattern[p + 1], c).then_some(p + 2),
        literal => eq(literal, c).then_some(p + 1),
    }
}

/// The bytes every key matching `pattern` starts with: the pattern up to its
/// first special byte, with escapes resolved. Lets `KEYS prefix*` visit only
/// the keys in that range of the ordered map.
pub fn literal_prefix(pattern: &[u8]) -> alloc::vec::Vec<u8> {
    let mut prefix = alloc::vec::Vec::new();
    let mut i = 0;
    while i < pattern.len() {
        match pattern[i] {
            b'*' | b'?' | b'[' => break,
            b'\\' if i + 1 < pattern.len() => {
                prefix.push(pattern[i + 1]);
                i += 2;
            }
            c => {
                prefix.push(c);
                i += 1;
            }
        }
    }
    prefix
}

/// Whether `pattern` matches exactly one string (no wildcards or sets).
pub fn is_literal(pattern: &[u8]) -> bool {
    let mut i = 0;
    while i < pattern.len() {
        match pattern[i] {
            b'*' | b'?' | b'[' => return false,
            b'\\' if i + 1 < pattern.len() => i += 2,
            _ => i += 1,
        }
    }
    true
}
