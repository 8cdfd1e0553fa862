//! Sparse attention's selection (FlexLLMGen's `attn_sparsity`): of a decode query's softmax
//! weights, keep the largest and drop the rest, the query's own key always kept.

/// Zeroes all but `keep` of the visible weights in `p` (`mask[j] != 0`): the last position (the
/// query's own key, the newest) and the `keep - 1` largest of the others, ties to the earlier
/// position. The kept weights are not renormalised: FlexLLMGen multiplies the values by the
/// dense softmax's weights of the kept keys.
pub fn keep_largest(p: &mut [f32], mask: &[u32], keep: usize) {
    let t = p.len().min(mask.len());
    if t == 0 {
        return;
    }
    let mut others: Vec<usize> = (0..t - 1).filter(|&j| mask[j] != 0).collect();
    let need = keep.saturating_sub(1);
    if need >= others.len() {
        return;
    }
    if need > 0 {
        others.select_nth_unstable_by(need - 1, |&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    }
    for &j in &others[need..] {
        p[j] = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_largest_and_the_newest() {
        let mask = [1, 0, 1, 1, 1, 1, 1];
        let base = [0.1f32, 0.0, 0.3, 0.05, 0.3, 0.2, 0.01];
        let mut p = base;
        keep_largest(&mut p, &mask, 3);
        // the newest (0.01) and the two largest of the rest: the tie 0.3 / 0.3 both fit
        assert_eq!(p, [0.0, 0.0, 0.3, 0.0, 0.3, 0.0, 0.01]);
        let mut p = base;
        keep_largest(&mut p, &mask, 2);
        // a tie at the cut goes to the earlier position
        assert_eq!(p, [0.0, 0.0, 0.3, 0.0, 0.0, 0.0, 0.01]);
        let mut p = base;
        keep_largest(&mut p, &mask, 1);
        assert_eq!(p, [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.01]);
        let mut p = base;
        keep_largest(&mut p, &mask, 6);
        assert_eq!(p, base, "everything visible is kept");
    }
}
