//! The burst-parallel video pipeline, in the style of ExCamera and Sprocket:
//! the source video is split into one chunk of consecutive frames per
//! function. Each function
//!
//! 1. makes its chunk (`source`: the generated test pattern stands in for
//!    fetching the chunk from storage),
//! 2. exchanges boundary frames with its neighbours (`exchange`): it sends
//!    its first frame to rank − 1 and its last to rank + 1, and receives
//!    theirs, because the temporal noise filter that runs before encoding
//!    needs one frame on either side of every frame,
//! 3. filters and encodes its chunk with OpenH264 (`encode`) as a closed
//!    group of pictures (an IDR frame, then P frames), as ExCamera's parallel
//!    pass and Sprocket's chunked encode do,
//! 4. sends the encoded chunk to the collector (`collect`), which
//!    concatenates the chunks in rank order into one Annex-B H.264 stream
//!    (every chunk starts with the same SPS/PPS and an IDR, so the
//!    concatenation is one valid, playable stream) and writes it.
//!
//! Functions print `phase=...` timeline lines (see `particle_workloads::timeline`),
//! one `exchanged from=R node=N bytes=B` line per boundary frame received
//! (the node tells whether the exchange crossed nodes), and the collector
//! prints `output path=P frames=F bytes=B width=W height=H`.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use openh264::decoder::Decoder;
use openh264::encoder::{Encoder, EncoderConfig, FrameRate, FrameType, QpRange, RateControlMode};
use openh264::formats::YUVSource;
use openh264::OpenH264API;

use particle_wire::function_env::FunctionEnv;
use particle_workloads::source::{chunk_range, frame_len, temporal_filter, Frame, TestPattern};
use particle_workloads::timeline::{self, now_ns};
use particle_workloads::wire::{self, Inbox, Message};

/// Message kinds of the pipeline.
const LAST_FRAME: u8 = 1; // a chunk's last source frame, to the next rank
const FIRST_FRAME: u8 = 2; // a chunk's first source frame, to the previous rank
const CHUNK: u8 = 3; // an encoded chunk, to the collector

#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    #[error("{0}")]
    Options(String),
    #[error("network: {0}")]
    Io(#[from] io::Error),
    #[error("OpenH264: {0}")]
    Codec(#[from] openh264::Error),
    #[error("rank {from} sent a bad {what}: {why}")]
    BadMessage {
        from: usize,
        what: &'static str,
        why: String,
    },
    #[error("the encoder skipped frame {0}; the output would be short")]
    Skipped(usize),
    #[error("writing {path}: {source}")]
    Output { path: PathBuf, source: io::Error },
    #[error("the output is not a decodable H.264 stream: {0}")]
    Undecodable(String),
}

#[derive(Debug, Clone)]
pub struct VideoOptions {
    pub width: usize,
    pub height: usize,
    /// Frames of the whole video (at least one per function).
    pub frames: usize,
    pub seed: u64,
    /// Quantiser of every frame (constant quality; 0 best .. 51 worst).
    pub qp: u8,
    /// The rank that collects the chunks and writes the output.
    pub collector: usize,
    /// Where the collector writes the Annex-B H.264 stream.
    pub output: PathBuf,
    pub timeout: Duration,
}

impl Default for VideoOptions {
    fn default() -> Self {
        Self {
            width: 320,
            height: 240,
            frames: 64,
            seed: 1,
            qp: 26,
            collector: 0,
            output: PathBuf::from("particle-video.h264"),
            timeout: Duration::from_secs(120),
        }
    }
}

impl VideoOptions {
    pub fn pattern(&self) -> TestPattern {
        TestPattern {
            width: self.width,
            height: self.height,
            seed: self.seed,
        }
    }

    fn check(&self, size: usize) -> Result<(), VideoError> {
        let bad = |why: String| Err(VideoError::Options(why));
        if self.width < 16 || self.height < 16 || self.width % 2 == 1 || self.height % 2 == 1 {
            return bad(format!(
                "{}x{}: width and height must be even and at least 16",
                self.width, self.height
            ));
        }
        if self.width > 4096 || self.height > 4096 {
            return bad(format!("{}x{} is over 4096x4096", self.width, self.height));
        }
        if self.frames < size {
            return bad(format!(
                "{} frames for {size} functions: every function needs at least one",
                self.frames
            ));
        }
        if self.collector >= size {
            return bad(format!(
                "collector rank {} in a job of {size}",
                self.collector
            ));
        }
        if self.qp > 51 {
            return bad(format!("qp {} is over 51", self.qp));
        }
        Ok(())
    }
}

/// What one function did (also printed as lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionReport {
    pub frames: std::ops::Range<usize>,
    pub encoded_bytes: usize,
    /// (rank, node) of every neighbour a boundary frame came from.
    pub exchanged_with: Vec<(usize, String)>,
    /// Set on the collector: frames and bytes written.
    pub output: Option<(usize, usize)>,
}

/// Runs function `env.rank` of the pipeline.
pub fn run(
    env: &FunctionEnv,
    opts: &VideoOptions,
    out: &mut impl Write,
) -> Result<FunctionReport, VideoError> {
    writeln!(out, "{}={}", particle_workloads::ring::STARTED, now_ns())?;
    opts.check(env.size)?;
    let deadline = Instant::now() + opts.timeout;
    let mut inbox = Inbox::listen(
        env.listen_port()
            .map_err(|e| VideoError::Options(e.to_string()))?,
    )?;
    let range = chunk_range(opts.frames, env.size, env.rank);
    let pattern = opts.pattern();

    let chunk: Vec<Frame> = timeline::timed(out, timeline::SOURCE, || {
        Ok::<_, VideoError>(range.clone().map(|i| pattern.frame(i)).collect())
    })?;

    let (before, after, exchanged_with) = timeline::timed(out, timeline::EXCHANGE, || {
        exchange_boundaries(env, opts, &range, &chunk, &mut inbox, deadline)
    })?;
    for (rank, node) in &exchanged_with {
        writeln!(
            out,
            "exchanged from={rank} node={node} bytes={}",
            frame_len(opts.width, opts.height)
        )?;
    }

    let encoded = timeline::timed(out, timeline::ENCODE, || {
        encode_chunk(&chunk, &before, &after, opts.qp, range.start)
    })?;
    writeln!(
        out,
        "chunk rank={} frames={}..{} bytes={}",
        env.rank,
        range.start,
        range.end,
        encoded.len()
    )?;

    let mut report = FunctionReport {
        frames: range.clone(),
        encoded_bytes: encoded.len(),
        exchanged_with,
        output: None,
    };
    let collect_start = now_ns();
    if env.rank == opts.collector {
        let (frames, bytes) = collect(env, opts, &range, encoded, &mut inbox, deadline)?;
        writeln!(
            out,
            "output path={} frames={frames} bytes={bytes} width={} height={}",
            opts.output.display(),
            opts.width,
            opts.height
        )?;
        report.output = Some((frames, bytes));
    } else {
        let mut payload = Vec::with_capacity(4 + encoded.len());
        payload.extend_from_slice(&(range.len() as u32).to_be_bytes());
        payload.extend_from_slice(&encoded);
        let m = message(env, CHUNK, payload);
        wire::send(&env.peers[opts.collector], &m, deadline)?;
    }
    timeline::write_phase(out, timeline::COLLECT, collect_start, now_ns())?;
    writeln!(out, "done_ns={}", now_ns())?;
    out.flush()?;
    Ok(report)
}

fn message(env: &FunctionEnv, kind: u8, payload: Vec<u8>) -> Message {
    Message {
        kind,
        from: env.rank,
        node: env.node.clone(),
        payload,
    }
}

/// A boundary frame on the wire: its index, then the I420 bytes.
fn boundary_payload(index: usize, frame: &Frame) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + frame.data.len());
    p.extend_from_slice(&(index as u64).to_be_bytes());
    p.extend_from_slice(&frame.data);
    p
}

fn parse_boundary(
    m: Message,
    expected_from: usize,
    expected_index: usize,
    opts: &VideoOptions,
) -> Result<Frame, VideoError> {
    let bad = |why: String| VideoError::BadMessage {
        from: m.from,
        what: "boundary frame",
        why,
    };
    if m.from != expected_from {
        return Err(bad(format!("expected it from rank {expected_from}")));
    }
    if m.payload.len() < 8 {
        return Err(bad("too short".into()));
    }
    let (index, data) = m.payload.split_at(8);
    let index = u64::from_be_bytes(index.try_into().map_err(|_| bad("index".into()))?) as usize;
    if index != expected_index {
        return Err(bad(format!("frame {index}, expected {expected_index}")));
    }
    Frame::from_bytes(opts.width, opts.height, data.to_vec()).ok_or_else(|| {
        bad(format!(
            "{} bytes is not one {}x{} frame",
            data.len(),
            opts.width,
            opts.height
        ))
    })
}

type Boundaries = (Frame, Frame, Vec<(usize, String)>);

/// Sends this chunk's edge frames to the neighbours and receives theirs.
/// Returns the frame before the chunk and the one after it (the chunk's own
/// edge frame at the ends of the video) and who sent them.
fn exchange_boundaries(
    env: &FunctionEnv,
    opts: &VideoOptions,
    range: &std::ops::Range<usize>,
    chunk: &[Frame],
    inbox: &mut Inbox,
    deadline: Instant,
) -> Result<Boundaries, VideoError> {
    let (first, last) = match (chunk.first(), chunk.last()) {
        (Some(f), Some(l)) => (f, l),
        _ => return Err(VideoError::Options("empty chunk".into())),
    };
    let has_prev = env.rank > 0;
    let has_next = env.rank + 1 < env.size;
    let mut exchanged = Vec::new();
    let (before, after) = std::thread::scope(|s| -> Result<(Frame, Frame), VideoError> {
        // Send both ways concurrently: a neighbour that is slow to come up
        // must not hold up the other direction.
        let mut sends = Vec::new();
        if has_prev {
            let m = message(env, FIRST_FRAME, boundary_payload(range.start, first));
            let target = &env.peers[env.rank - 1];
            sends.push(s.spawn(move || wire::send(target, &m, deadline)));
        }
        if has_next {
            let m = message(env, LAST_FRAME, boundary_payload(range.end - 1, last));
            let target = &env.peers[env.rank + 1];
            sends.push(s.spawn(move || wire::send(target, &m, deadline)));
        }
        let before = if has_prev {
            let m = inbox.recv(LAST_FRAME, deadline)?;
            exchanged.push((m.from, m.node.clone()));
            parse_boundary(m, env.rank - 1, range.start - 1, opts)?
        } else {
            first.clone()
        };
        let after = if has_next {
            let m = inbox.recv(FIRST_FRAME, deadline)?;
            exchanged.push((m.from, m.node.clone()));
            parse_boundary(m, env.rank + 1, range.end, opts)?
        } else {
            last.clone()
        };
        for h in sends {
            h.join()
                .map_err(|_| io::Error::other("a sending thread panicked"))??;
        }
        Ok((before, after))
    })?;
    Ok((before, after, exchanged))
}

/// The encoder every function uses: constant quantiser, no frame skipping
/// (the output must have every frame), one thread (functions are the
/// parallelism), one IDR at the start of the chunk.
fn encoder(qp: u8) -> Result<Encoder, VideoError> {
    let config = EncoderConfig::new()
        .rate_control_mode(RateControlMode::Off)
        .qp(QpRange::new(qp, qp))
        .skip_frames(false)
        .max_frame_rate(FrameRate::from_hz(30.0))
        .num_threads(1)
        .scene_change_detect(false);
    Ok(Encoder::with_api_config(
        OpenH264API::from_source(),
        config,
    )?)
}

/// Filters and encodes a chunk; returns its Annex-B bytes.
pub fn encode_chunk(
    chunk: &[Frame],
    before: &Frame,
    after: &Frame,
    qp: u8,
    first_index: usize,
) -> Result<Vec<u8>, VideoError> {
    let mut enc = encoder(qp)?;
    let mut bytes = Vec::new();
    for (i, cur) in chunk.iter().enumerate() {
        let prev = if i == 0 { before } else { &chunk[i - 1] };
        let next = chunk.get(i + 1).unwrap_or(after);
        let filtered = temporal_filter(prev, cur, next);
        let stream = enc.encode(&I420(&filtered))?;
        match stream.frame_type() {
            FrameType::Skip | FrameType::Invalid => {
                return Err(VideoError::Skipped(first_index + i))
            }
            _ => stream.write_vec(&mut bytes),
        }
    }
    Ok(bytes)
}

/// The collector: its own chunk plus every other function's, in rank order,
/// written as one stream. Returns (frames, bytes) written.
fn collect(
    env: &FunctionEnv,
    opts: &VideoOptions,
    own_range: &std::ops::Range<usize>,
    own: Vec<u8>,
    inbox: &mut Inbox,
    deadline: Instant,
) -> Result<(usize, usize), VideoError> {
    let mut chunks: Vec<Option<Vec<u8>>> = vec![None; env.size];
    chunks[env.rank] = Some(own);
    let mut frames = own_range.len();
    for _ in 1..env.size {
        let m = inbox.recv(CHUNK, deadline)?;
        let bad = |why: String| VideoError::BadMessage {
            from: m.from,
            what: "chunk",
            why,
        };
        if m.from >= env.size || chunks[m.from].is_some() {
            return Err(bad("unexpected or duplicate sender".into()));
        }
        let Some((count, data)) = m.payload.split_first_chunk::<4>() else {
            return Err(bad("too short".into()));
        };
        let count = u32::from_be_bytes(*count) as usize;
        let expected = chunk_range(opts.frames, env.size, m.from).len();
        if count != expected {
            return Err(bad(format!("{count} frames, expected {expected}")));
        }
        frames += count;
        chunks[m.from] = Some(data.to_vec());
    }
    let stream: Vec<u8> = chunks.into_iter().flatten().flatten().collect();
    write_atomically(&opts.output, &stream)?;
    Ok((frames, stream.len()))
}

/// Writes next to the target and renames, so a reader never sees half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), VideoError> {
    let err = |source| VideoError::Output {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".part");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// An I420 frame as OpenH264 reads it.
struct I420<'a>(&'a Frame);

impl YUVSource for I420<'_> {
    fn dimensions(&self) -> (usize, usize) {
        (self.0.width, self.0.height)
    }

    fn strides(&self) -> (usize, usize, usize) {
        (self.0.width, self.0.width / 2, self.0.width / 2)
    }

    fn y(&self) -> &[u8] {
        self.0.y()
    }

    fn u(&self) -> &[u8] {
        self.0.u()
    }

    fn v(&self) -> &[u8] {
        self.0.v()
    }
}

/// Decodes an Annex-B H.264 stream into its frames (for checking outputs).
pub fn decode(stream: &[u8]) -> Result<Vec<Frame>, VideoError> {
    let undecodable = |e: openh264::Error| VideoError::Undecodable(e.to_string());
    let mut decoder = Decoder::new().map_err(undecodable)?;
    let mut frames = Vec::new();
    for packet in openh264::nal_units(stream) {
        if let Some(yuv) = decoder.decode(packet).map_err(undecodable)? {
            frames.push(to_frame(&yuv));
        }
    }
    for yuv in decoder.flush_remaining().map_err(undecodable)? {
        frames.push(to_frame(&yuv));
    }
    if frames.is_empty() {
        return Err(VideoError::Undecodable("no frame in it".into()));
    }
    Ok(frames)
}

/// Copies a decoded picture out of the decoder's strided buffers.
fn to_frame(yuv: &impl YUVSource) -> Frame {
    let (w, h) = yuv.dimensions();
    let (ys, us, vs) = yuv.strides();
    let mut data = Vec::with_capacity(frame_len(w, h));
    for row in yuv.y().chunks(ys).take(h) {
        data.extend_from_slice(&row[..w]);
    }
    for (plane, stride) in [(yuv.u(), us), (yuv.v(), vs)] {
        for row in plane.chunks(stride).take(h / 2) {
            data.extend_from_slice(&row[..w / 2]);
        }
    }
    Frame {
        width: w,
        height: h,
        data,
    }
}

/// Peak signal-to-noise ratio of `a`'s luma against `b`'s, in dB.
pub fn luma_psnr(a: &Frame, b: &Frame) -> f64 {
    let n = a.y().len().min(b.y().len()).max(1);
    let sse: f64 = a
        .y()
        .iter()
        .zip(b.y())
        .map(|(&x, &y)| {
            let d = x as f64 - y as f64;
            d * d
        })
        .sum();
    if sse == 0.0 {
        return f64::INFINITY;
    }
    10.0 * (255.0f64 * 255.0 / (sse / n as f64)).log10()
}

/// The whole pipeline in one process, chunk by chunk, with the same split,
/// filter and encoder as the functions: what a correct distributed run
/// must produce byte for byte.
pub fn reference_stream(opts: &VideoOptions, size: usize) -> Result<Vec<u8>, VideoError> {
    opts.check(size)?;
    let pattern = opts.pattern();
    let mut stream = Vec::new();
    for rank in 0..size {
        let range = chunk_range(opts.frames, size, rank);
        let chunk: Vec<Frame> = range.clone().map(|i| pattern.frame(i)).collect();
        let before = pattern.frame(range.start.saturating_sub(1));
        let after = pattern.frame((range.end).min(opts.frames - 1));
        stream.extend(encode_chunk(&chunk, &before, &after, opts.qp, range.start)?);
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> VideoOptions {
        VideoOptions {
            width: 64,
            height: 48,
            frames: 6,
            ..VideoOptions::default()
        }
    }

    #[test]
    fn a_chunk_encodes_and_decodes_to_its_frames() {
        let opts = small();
        let p = opts.pattern();
        let chunk: Vec<Frame> = (0..4).map(|i| p.frame(i)).collect();
        let bytes = encode_chunk(&chunk, &chunk[0], &p.frame(4), opts.qp, 0).unwrap();
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.len(), 4);
        // What the encoder was given: the filtered frames.
        let filtered: Vec<Frame> = (0..6)
            .map(|i| temporal_filter(&p.frame(i.max(1) - 1), &p.frame(i), &p.frame(i + 1)))
            .collect();
        for (i, f) in decoded.iter().enumerate() {
            assert_eq!((f.width, f.height), (64, 48));
            // Each decoded frame is closest to its own input: the pattern
            // moves, so a frame out of order would not be.
            let own = luma_psnr(f, &filtered[i]);
            assert!(own > 30.0, "frame {i}: {own:.1} dB");
            assert!(own > luma_psnr(f, &filtered[i + 2]), "frame {i}");
        }
    }

    #[test]
    fn chunks_concatenate_into_one_stream() {
        let opts = small();
        let stream = reference_stream(&opts, 3).unwrap();
        assert_eq!(decode(&stream).unwrap().len(), opts.frames);
    }

    #[test]
    fn bad_options_are_refused() {
        for (opts, size) in [
            (
                VideoOptions {
                    width: 63,
                    ..small()
                },
                2,
            ),
            (
                VideoOptions {
                    frames: 2,
                    ..small()
                },
                3,
            ),
            (
                VideoOptions {
                    collector: 3,
                    ..small()
                },
                3,
            ),
            (VideoOptions { qp: 60, ..small() }, 3),
        ] {
            assert!(
                matches!(opts.check(size), Err(VideoError::Options(_))),
                "{opts:?}"
            );
        }
        assert!(decode(b"not h264").is_err());
    }
}
