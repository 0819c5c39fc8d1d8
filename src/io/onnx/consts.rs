//! Constant folding: the ops that exporters apply to weights and shapes (Shape, Gather, Concat, Unsqueeze,
//! Reshape, Transpose of a weight, Cast, Expand, arithmetic on constants) are evaluated when the graph is loaded.
//! The batch size is a symbol ([`Dim::Batch`]), so `x.view(x.size(0), -1)` folds to a reshape that keeps the
//! batch dimension.

use super::tensor::{Const, Data, Dim};

fn strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

/// The element count of `dims`, `None` on overflow (dimensions read from a file may be anything).
pub(crate) fn numel(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// NumPy broadcasting of two shapes.
pub(crate) fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let get = |s: &[usize], i: usize| {
        if i + s.len() < n {
            1
        } else {
            s[i + s.len() - n]
        }
    };
    (0..n)
        .map(|i| match (get(a, i), get(b, i)) {
            (x, y) if x == y => Some(x),
            (1, y) => Some(y),
            (x, 1) => Some(x),
            _ => None,
        })
        .collect()
}

/// For each element of `out` (row-major), the index of the element of a tensor of `dims` broadcast to it.
fn broadcast_index(dims: &[usize], out: &[usize]) -> Vec<usize> {
    let total: usize = out.iter().product();
    let off = out.len() - dims.len();
    let st = strides(dims);
    let ost = strides(out);
    (0..total)
        .map(|flat| {
            let mut idx = 0;
            for (k, &d) in dims.iter().enumerate() {
                let coord = (flat / ost[k + off]) % out[k + off];
                if d != 1 {
                    idx += coord * st[k];
                }
            }
            idx
        })
        .collect()
}

fn pick(c: &Const, idx: &[usize], dims: Vec<usize>) -> Const {
    match &c.data {
        Data::F(v) => Const::floats(dims, idx.iter().map(|&i| v[i]).collect()),
        Data::I(v) => Const::ints(dims, idx.iter().map(|&i| v[i]).collect()),
    }
}

/// Add, Sub, Mul, Div (and Pow for floats) of two constants, with broadcasting.
pub(crate) fn binary(op: &str, a: &Const, b: &Const) -> Result<Const, String> {
    let dims = broadcast_shape(&a.dims, &b.dims)
        .ok_or_else(|| format!("shapes {:?} and {:?} do not broadcast", a.dims, b.dims))?;
    let (ia, ib) = (
        broadcast_index(&a.dims, &dims),
        broadcast_index(&b.dims, &dims),
    );
    if matches!(a.data, Data::F(_)) || matches!(b.data, Data::F(_)) {
        let (x, y) = (a.to_f64()?, b.to_f64()?);
        let f = |p: f64, q: f64| match op {
            "Add" => p + q,
            "Sub" => p - q,
            "Mul" => p * q,
            "Div" => p / q,
            _ => p.powf(q),
        };
        return Ok(Const::floats(
            dims,
            ia.iter().zip(&ib).map(|(&i, &j)| f(x[i], y[j])).collect(),
        ));
    }
    let (x, y) = (a.to_i64()?, b.to_i64()?);
    let v = ia
        .iter()
        .zip(&ib)
        .map(|(&i, &j)| {
            let (p, q) = (x[i], y[j]);
            Ok(Dim::K(match op {
                "Add" => p.wrapping_add(q),
                "Sub" => p.wrapping_sub(q),
                "Mul" => p.wrapping_mul(q),
                "Div" if q != 0 => p.div_euclid(q),
                "Div" => return Err("integer division by zero".to_string()),
                _ => return Err(format!("{op} of integer constants")),
            }))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Const::ints(dims, v))
}

/// A normalised axis in 0..rank.
pub(crate) fn axis(a: i64, rank: usize) -> Result<usize, String> {
    let r = rank as i64;
    let v = if a < 0 { a + r } else { a };
    if v < 0 || v >= r {
        return Err(format!("axis {a} out of range for rank {rank}"));
    }
    Ok(v as usize)
}

pub(crate) fn gather(data: &Const, indices: &Const, ax: i64) -> Result<Const, String> {
    let ax = axis(ax, data.dims.len())?;
    let idx = indices.to_i64()?;
    let d = data.dims[ax];
    let norm = idx
        .iter()
        .map(|&i| {
            let j = if i < 0 { i + d as i64 } else { i };
            (0..d as i64)
                .contains(&j)
                .then_some(j as usize)
                .ok_or_else(|| format!("index {i} out of range for a dimension of {d}"))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let outer: usize = data.dims[..ax].iter().product();
    let inner: usize = data.dims[ax + 1..].iter().product();
    let mut flat = vec![];
    for o in 0..outer {
        for &j in &norm {
            for i in 0..inner {
                flat.push((o * d + j) * inner + i);
            }
        }
    }
    let mut dims = data.dims[..ax].to_vec();
    dims.extend_from_slice(&indices.dims);
    dims.extend_from_slice(&data.dims[ax + 1..]);
    Ok(pick(data, &flat, dims))
}

pub(crate) fn unsqueeze(c: &Const, axes: &[i64]) -> Result<Const, String> {
    let rank = c.dims.len() + axes.len();
    let mut ax = axes
        .iter()
        .map(|&a| axis(a, rank))
        .collect::<Result<Vec<_>, _>>()?;
    ax.sort_unstable();
    let mut dims = c.dims.clone();
    for a in ax {
        dims.insert(a, 1);
    }
    Ok(Const {
        dims,
        data: c.data.clone(),
    })
}

pub(crate) fn squeeze(c: &Const, axes: Option<&[i64]>) -> Result<Const, String> {
    let rank = c.dims.len();
    let drop: Vec<usize> = match axes {
        Some(a) => a.iter().map(|&v| axis(v, rank)).collect::<Result<_, _>>()?,
        None => (0..rank).filter(|&i| c.dims[i] == 1).collect(),
    };
    if let Some(&bad) = drop.iter().find(|&&i| c.dims[i] != 1) {
        return Err(format!("cannot squeeze axis {bad} of size {}", c.dims[bad]));
    }
    let dims = (0..rank)
        .filter(|i| !drop.contains(i))
        .map(|i| c.dims[i])
        .collect();
    Ok(Const {
        dims,
        data: c.data.clone(),
    })
}

pub(crate) fn concat(cs: &[&Const], ax: i64) -> Result<Const, String> {
    let first = cs.first().ok_or("Concat of nothing")?;
    let ax = axis(ax, first.dims.len())?;
    let floats = cs.iter().any(|c| matches!(c.data, Data::F(_)));
    let outer: usize = first.dims[..ax].iter().product();
    let mut dims = first.dims.clone();
    dims[ax] = 0;
    for c in cs {
        if c.dims.len() != first.dims.len()
            || c.dims
                .iter()
                .enumerate()
                .any(|(i, &d)| i != ax && d != first.dims[i])
        {
            return Err(format!(
                "Concat of shapes {:?} and {:?} on axis {ax}",
                first.dims, c.dims
            ));
        }
        dims[ax] += c.dims[ax];
    }
    let chunk = |c: &Const| c.len() / outer.max(1);
    if floats {
        let vs = cs
            .iter()
            .map(|c| c.to_f64())
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = vec![];
        for o in 0..outer {
            for (c, v) in cs.iter().zip(&vs) {
                out.extend_from_slice(&v[o * chunk(c)..(o + 1) * chunk(c)]);
            }
        }
        return Ok(Const::floats(dims, out));
    }
    let vs: Vec<Vec<Dim>> = cs.iter().map(|c| c.to_dims()).collect();
    let mut out = vec![];
    for o in 0..outer {
        for (c, v) in cs.iter().zip(&vs) {
            out.extend_from_slice(&v[o * chunk(c)..(o + 1) * chunk(c)]);
        }
    }
    Ok(Const::ints(dims, out))
}

/// ONNX Reshape's target: 0 copies the input's dimension (unless `allowzero`), one -1 is inferred.
pub(crate) fn reshape_target(
    input: &[usize],
    target: &[i64],
    allowzero: bool,
) -> Result<Vec<usize>, String> {
    let total: usize = input.iter().product();
    let mut out = vec![];
    let mut infer = None;
    for (i, &t) in target.iter().enumerate() {
        match t {
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            0 if !allowzero => out.push(*input.get(i).ok_or_else(|| {
                format!("shape {target:?}: 0 at {i} copies a dimension the input lacks")
            })?),
            t if t >= 0 => out.push(t as usize),
            _ => return Err(format!("invalid reshape target {target:?}")),
        }
    }
    let known = numel(&out).ok_or_else(|| format!("reshape target {target:?} overflows"))?;
    if let Some(i) = infer {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(format!("cannot reshape {input:?} to {target:?}"));
        }
        out[i] = total / known;
    }
    if numel(&out) != Some(total) {
        return Err(format!(
            "cannot reshape {input:?} ({total} elements) to {target:?}"
        ));
    }
    Ok(out)
}

pub(crate) fn transpose(c: &Const, perm: Option<&[i64]>) -> Result<Const, String> {
    let rank = c.dims.len();
    let perm: Vec<usize> = match perm {
        Some(p) => p.iter().map(|&a| axis(a, rank)).collect::<Result<_, _>>()?,
        None => (0..rank).rev().collect(),
    };
    let mut seen = vec![false; rank];
    for &p in &perm {
        if std::mem::replace(&mut seen[p], true) {
            return Err(format!("perm {perm:?} is not a permutation"));
        }
    }
    if perm.len() != rank {
        return Err(format!("perm {perm:?} for rank {rank}"));
    }
    let dims: Vec<usize> = perm.iter().map(|&p| c.dims[p]).collect();
    let (ist, ost) = (strides(&c.dims), strides(&dims));
    let total: usize = dims.iter().product();
    let idx: Vec<usize> = (0..total)
        .map(|flat| {
            perm.iter()
                .enumerate()
                .map(|(k, &p)| ((flat / ost[k]) % dims[k]) * ist[p])
                .sum()
        })
        .collect();
    Ok(pick(c, &idx, dims))
}

pub(crate) fn expand(c: &Const, shape: &[i64]) -> Result<Const, String> {
    let target: Vec<usize> = shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("invalid Expand shape {shape:?}")))
        .collect::<Result<_, _>>()?;
    let dims = broadcast_shape(&c.dims, &target)
        .ok_or_else(|| format!("cannot expand {:?} to {shape:?}", c.dims))?;
    if numel(&dims).is_none_or(|n| n as u128 > super::tensor::MAX_ELEMENTS) {
        return Err(format!("Expand to {dims:?} is too large"));
    }
    Ok(pick(c, &broadcast_index(&c.dims, &dims), dims))
}

/// Slice of a constant along its axes (steps may be negative), as ONNX Slice.
pub(crate) fn slice(
    c: &Const,
    starts: &[i64],
    ends: &[i64],
    axes: Option<&[i64]>,
    steps: Option<&[i64]>,
) -> Result<Const, String> {
    let rank = c.dims.len();
    let axes: Vec<usize> = match axes {
        Some(a) => a.iter().map(|&v| axis(v, rank)).collect::<Result<_, _>>()?,
        None => (0..starts.len()).collect(),
    };
    if starts.len() != axes.len() || ends.len() != axes.len() {
        return Err("Slice: starts, ends and axes differ in length".into());
    }
    let mut ranges: Vec<Vec<usize>> = c.dims.iter().map(|&d| (0..d).collect()).collect();
    for (k, &a) in axes.iter().enumerate() {
        let d = c.dims[a] as i64;
        let step = steps.map_or(1, |s| s.get(k).copied().unwrap_or(1));
        if step == 0 {
            return Err("Slice: step 0".into());
        }
        let clampi = |v: i64, lo: i64, hi: i64| {
            let v = if v < 0 { v + d } else { v };
            v.clamp(lo, hi)
        };
        let mut r = vec![];
        if step > 0 {
            let (s, e) = (clampi(starts[k], 0, d), clampi(ends[k], 0, d));
            let mut i = s;
            while i < e {
                r.push(i as usize);
                i += step;
            }
        } else {
            let (s, e) = (clampi(starts[k], -1, d - 1), clampi(ends[k], -1, d - 1));
            let mut i = s;
            while i > e {
                r.push(i as usize);
                i += step;
            }
        }
        ranges[a] = r;
    }
    let dims: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
    let st = strides(&c.dims);
    let ost = strides(&dims);
    let total: usize = dims.iter().product();
    let idx: Vec<usize> = (0..total)
        .map(|flat| {
            (0..rank)
                .map(|k| ranges[k][(flat / ost[k]) % dims[k]] * st[k])
                .sum()
        })
        .collect();
    Ok(pick(c, &idx, dims))
}

/// ONNX Cast of a constant to type `to` (floats or integers).
pub(crate) fn cast(c: &Const, to: i64) -> Result<Const, String> {
    Ok(match to {
        1 | 10 | 11 | 16 => Const::floats(c.dims.clone(), c.to_f64()?),
        2 | 3 | 6 | 7 | 9 | 12 | 13 => Const::ints(c.dims.clone(), c.to_dims()),
        _ => return Err(format!("Cast to data type {to}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(dims: &[usize], v: &[f64]) -> Const {
        Const::floats(dims.to_vec(), v.to_vec())
    }

    #[test]
    fn folding_matches_numpy() {
        let a = f(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
        let t = transpose(&a, None).unwrap();
        assert_eq!(t.dims, vec![3, 2]);
        assert_eq!(t.to_f64().unwrap(), vec![1., 4., 2., 5., 3., 6.]);
        let b = binary("Mul", &a, &f(&[3], &[1., 10., 100.])).unwrap();
        assert_eq!(b.to_f64().unwrap(), vec![1., 20., 300., 4., 50., 600.]);
        let g = gather(&a, &Const::ints(vec![], vec![Dim::K(-1)]), 1).unwrap();
        assert_eq!(
            (g.dims.clone(), g.to_f64().unwrap()),
            (vec![2], vec![3., 6.])
        );
        let s = slice(&a, &[-1], &[i64::MIN], Some(&[1]), Some(&[-1])).unwrap();
        assert_eq!(s.to_f64().unwrap(), vec![3., 2., 1., 6., 5., 4.]);
        let e = expand(&f(&[1], &[7.]), &[2, 2]).unwrap();
        assert_eq!(e.to_f64().unwrap(), vec![7.; 4]);
        let shape = Const::ints(vec![4], vec![Dim::Batch, Dim::K(3), Dim::K(2), Dim::K(2)]);
        let n = gather(&shape, &Const::ints(vec![], vec![Dim::K(0)]), 0).unwrap();
        let cat = concat(
            &[
                &unsqueeze(&n, &[0]).unwrap(),
                &Const::ints(vec![1], vec![Dim::K(-1)]),
            ],
            0,
        )
        .unwrap();
        assert_eq!(cat.to_dims(), vec![Dim::Batch, Dim::K(-1)]);
        assert_eq!(
            reshape_target(&[3, 2, 2], &[0, -1], false).unwrap(),
            vec![3, 4]
        );
        assert!(binary("Add", &a, &f(&[2], &[1., 2.])).is_err());
    }
}
