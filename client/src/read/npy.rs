//! The .npy format (numpy's array files), as far as a matrix of vectors needs it.
use std::path::PathBuf;

use anyhow::Context;

/// A 2-d little-endian float32 or float64 .npy matrix (C order), as rows of f32.
pub fn read_npy(path: &PathBuf) -> anyhow::Result<Vec<Vec<f32>>> {
    let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
    let bad = |why: &str| anyhow::anyhow!("{}: {why}", path.display());
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file"));
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        _ => return Err(bad("unsupported .npy version")),
    };
    let header = std::str::from_utf8(bytes.get(start..start + header_len).ok_or_else(|| bad("truncated header"))?)
        .map_err(|_| bad("header is not text"))?;
    let width = if header.contains("'<f4'") {
        4
    } else if header.contains("'<f8'") {
        8
    } else {
        return Err(bad("dtype must be little-endian float32 or float64"));
    };
    if header.contains("'fortran_order': True") {
        return Err(bad("Fortran order is not supported; save with numpy.ascontiguousarray"));
    }
    let shape = header
        .split("'shape':")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .map(|r| r.trim().trim_start_matches('(').split(',').filter_map(|d| d.trim().parse::<usize>().ok()).collect::<Vec<_>>())
        .ok_or_else(|| bad("no shape in the header"))?;
    let [rows, cols] = shape[..] else {
        return Err(bad("must be a 2-d matrix (documents x dims)"));
    };
    let data = &bytes[start + header_len..];
    if data.len() != rows * cols * width {
        return Err(bad("data size does not match the shape"));
    }
    let value = |i: usize| -> f32 {
        let b = &data[i * width..(i + 1) * width];
        if width == 4 { f32::from_le_bytes(b.try_into().expect("4 bytes")) } else { f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32 }
    };
    Ok((0..rows).map(|r| (0..cols).map(|c| value(r * cols + c)).collect()).collect())
}
