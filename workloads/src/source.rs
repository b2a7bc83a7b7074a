//! The pipeline's source video, generated in-process: a moving test pattern
//! (scrolling colour bars and a bouncing box) with per-pixel noise. Frame `i`
//! depends only on (width, height, seed, i), so every function makes its own
//! chunk instead of downloading it: this stands in for fetching the chunk
//! from storage, without a download or a system codec.

/// One I420 frame: the Y plane, then U and V at half resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Frame {
    pub fn new(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            data: vec![0; frame_len(width, height)],
        }
    }

    /// From raw I420 bytes (as exchanged between functions).
    pub fn from_bytes(width: usize, height: usize, data: Vec<u8>) -> Option<Self> {
        (data.len() == frame_len(width, height)).then_some(Self {
            width,
            height,
            data,
        })
    }

    pub fn y(&self) -> &[u8] {
        &self.data[..self.width * self.height]
    }

    pub fn u(&self) -> &[u8] {
        let y = self.width * self.height;
        &self.data[y..y + y / 4]
    }

    pub fn v(&self) -> &[u8] {
        let y = self.width * self.height;
        &self.data[y + y / 4..]
    }
}

pub fn frame_len(width: usize, height: usize) -> usize {
    width * height * 3 / 2
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestPattern {
    pub width: usize,
    pub height: usize,
    pub seed: u64,
}

/// BT.601 (Y, U, V) of the bars: white, yellow, cyan, green, magenta, red, blue, black.
const BARS: [(u8, u8, u8); 8] = [
    (235, 128, 128),
    (210, 16, 146),
    (170, 166, 16),
    (145, 54, 34),
    (106, 202, 222),
    (81, 90, 240),
    (41, 240, 110),
    (16, 128, 128),
];

/// Noise amplitude on luma, +-.
const NOISE: i32 = 10;

impl TestPattern {
    pub fn frame(&self, index: usize) -> Frame {
        let (w, h) = (self.width, self.height);
        let mut f = Frame::new(w, h);
        let scroll = index * 3;
        let bar_width = (w / BARS.len()).max(1);
        let (bx, by, side) = self.box_at(index);
        let inside = |x: usize, y: usize| x >= bx && x < bx + side && y >= by && y < by + side;
        let bar = |x: usize| BARS[((x + scroll) / bar_width) % BARS.len()];

        let (ys, uv) = f.data.split_at_mut(w * h);
        for y in 0..h {
            for x in 0..w {
                let base = if inside(x, y) { 128 } else { bar(x).0 as i32 };
                let n = noise(self.seed, index as u64, (y * w + x) as u64);
                ys[y * w + x] = (base + n).clamp(0, 255) as u8;
            }
        }
        let (us, vs) = uv.split_at_mut(w * h / 4);
        for y in 0..h / 2 {
            for x in 0..w / 2 {
                let (u, v) = if inside(2 * x, 2 * y) {
                    // The box is a saturated orange, easy to follow by eye.
                    (60, 200)
                } else {
                    let (_, u, v) = bar(2 * x);
                    (u, v)
                };
                us[y * w / 2 + x] = u;
                vs[y * w / 2 + x] = v;
            }
        }
        f
    }

    /// The bouncing box: top-left corner and side, for frame `index`.
    fn box_at(&self, index: usize) -> (usize, usize, usize) {
        let side = (self.width.min(self.height) / 4).max(2);
        let bounce = |span: usize, speed: usize| {
            let span = span.max(1);
            let p = (index * speed) % (2 * span);
            if p < span {
                p
            } else {
                2 * span - p
            }
        };
        (
            bounce(self.width.saturating_sub(side), 5),
            bounce(self.height.saturating_sub(side), 3),
            side,
        )
    }
}

/// Deterministic noise in [-NOISE, NOISE] (splitmix64 of the sample's coordinates).
fn noise(seed: u64, frame: u64, sample: u64) -> i32 {
    let mut z = seed
        ^ frame.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ sample.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z % (2 * NOISE as u64 + 1)) as i32 - NOISE
}

/// The frames `[start, end)` of chunk `rank` when `frames` are split over `size` functions
/// as evenly as possible.
pub fn chunk_range(frames: usize, size: usize, rank: usize) -> std::ops::Range<usize> {
    frames * rank / size..frames * (rank + 1) / size
}

/// The temporal noise filter the pipeline runs before encoding: each sample
/// becomes (previous + 2 * current + next) / 4. It needs one frame before and
/// one after, which at a chunk's edges belong to the neighbouring chunks.
pub fn temporal_filter(prev: &Frame, cur: &Frame, next: &Frame) -> Frame {
    let data = cur
        .data
        .iter()
        .zip(&prev.data)
        .zip(&next.data)
        .map(|((&c, &p), &n)| ((p as u16 + 2 * c as u16 + n as u16 + 2) / 4) as u8)
        .collect();
    Frame {
        width: cur.width,
        height: cur.height,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_deterministic_moving_and_noisy() {
        let p = TestPattern {
            width: 64,
            height: 48,
            seed: 7,
        };
        let a = p.frame(3);
        assert_eq!(a.data.len(), frame_len(64, 48));
        assert_eq!(a, p.frame(3));
        assert_ne!(a, p.frame(4), "the pattern moves");
        let other_seed = TestPattern { seed: 8, ..p }.frame(3);
        assert_ne!(a.y(), other_seed.y(), "noise depends on the seed");
        assert_eq!(a.u(), other_seed.u(), "chroma is noise-free");
    }

    #[test]
    fn chunks_cover_every_frame_once() {
        for (frames, size) in [(10, 3), (8, 8), (100, 7)] {
            let mut next = 0;
            for rank in 0..size {
                let r = chunk_range(frames, size, rank);
                assert_eq!(r.start, next);
                assert!(!r.is_empty());
                next = r.end;
            }
            assert_eq!(next, frames);
        }
    }

    #[test]
    fn the_filter_averages_over_time() {
        let f = |v: u8| Frame {
            width: 2,
            height: 2,
            data: vec![v; 6],
        };
        assert_eq!(temporal_filter(&f(0), &f(100), &f(200)).data, vec![100; 6]);
        assert_eq!(temporal_filter(&f(10), &f(10), &f(10)).data, vec![10; 6]);
    }
}
