//! report.csv: one row per case (its latest record), one column per field of
//! [`crate::fields::FIELDS`] that has a CSV name, numbers in full precision.

use bench_core::Record;

use crate::fields::FIELDS;

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub fn csv(recs: &[Record]) -> String {
    let columns: Vec<_> = FIELDS.iter().filter(|f| f.csv.is_some()).collect();
    let header: Vec<&str> = columns.iter().filter_map(|f| f.csv).collect();
    let mut s = header.join(",") + "\n";
    for r in recs {
        let fields: Vec<String> = columns.iter().map(|f| csv_field(&f.csv_value(r))).collect();
        s.push_str(&fields.join(","));
        s.push('\n');
    }
    s
}
