//! Generated message content shared by the unit tests of [`crate::parse`] and
//! [`crate::pipeline`].

/// `len` deterministic bytes that look random (an LCG's high byte), like a PDF's body.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

/// `bytes` in base64 as a mail client writes it: lines of 76 characters joined by CRLF, without
/// a line break after the last.
pub fn base64_lines(bytes: &[u8]) -> String {
    use base64::Engine as _;
    let one = base64::engine::general_purpose::STANDARD.encode(bytes);
    let lines: Vec<&str> = one
        .as_bytes()
        .chunks(76)
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    lines.join("\r\n")
}
