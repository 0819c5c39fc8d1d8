//! An experiment's report: tables for people (Markdown), every number for machines (JSON), a line plot (SVG
//! through plotters), and the verdicts on the claims.

use crate::{NvError, Result};
use plotters::prelude::*;
use serde::Serialize;
use std::path::Path;

/// A table with a title, column headers and rows of cells.
#[derive(Debug, Clone, Serialize)]
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: &str, columns: &[&str]) -> Table {
        Table {
            title: title.into(),
            columns: columns.iter().map(|s| s.to_string()).collect(),
            rows: vec![],
        }
    }
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
    /// GitHub-flavoured Markdown, columns padded for reading in a terminal.
    pub fn markdown(&self) -> String {
        let n = self.columns.len();
        let mut w: Vec<usize> = self.columns.iter().map(|c| c.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let v: Vec<String> = (0..n)
                .map(|i| {
                    let c = cells.get(i).map(String::as_str).unwrap_or("");
                    format!("{c:<width$}", width = w[i])
                })
                .collect();
            format!("| {} |", v.join(" | "))
        };
        let mut s = format!("### {}\n\n{}\n", self.title, line(&self.columns));
        let sep: Vec<String> = w.iter().map(|&k| "-".repeat(k)).collect();
        s += &format!("| {} |\n", sep.join(" | "));
        for r in &self.rows {
            s += &line(r);
            s += "\n";
        }
        s
    }
}

/// How far a claim holds here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Confirmed,
    Partly,
    NotReproduced,
}

impl Status {
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Confirmed => "confirmed",
            Status::Partly => "partly",
            Status::NotReproduced => "not reproduced",
        }
    }
}

/// One claim checked: what the paper says, what we measured, and whether it holds here.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub claim: String,
    pub paper: String,
    pub ours: String,
    pub holds: bool,
    /// The graded verdict (`None`: confirmed when `holds`, not reproduced otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// Why: what explains a difference from the paper (scale, data set, or a real disagreement).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub why: String,
}

impl Verdict {
    /// A graded verdict; `holds` unless not reproduced.
    pub fn graded(claim: &str, paper: &str, ours: String, status: Status, why: &str) -> Verdict {
        Verdict {
            claim: claim.into(),
            paper: paper.into(),
            ours,
            holds: status != Status::NotReproduced,
            status: Some(status),
            why: why.into(),
        }
    }
    /// The graded verdict, or the one `holds` implies.
    pub fn status(&self) -> Status {
        self.status.unwrap_or(if self.holds {
            Status::Confirmed
        } else {
            Status::NotReproduced
        })
    }
}

/// A line of a plot: a label and its (x, y) points.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A line plot.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Plot {
    pub title: String,
    pub x: String,
    pub y: String,
    pub series: Vec<Series>,
}

/// What an experiment reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub name: String,
    /// The command that reproduces it.
    pub command: String,
    pub quick: bool,
    pub setup: String,
    pub tables: Vec<Table>,
    pub verdicts: Vec<Verdict>,
    pub plot: Option<Plot>,
    /// Further plots (written as NAME-2.svg, NAME-3.svg, …).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra_plots: Vec<Plot>,
    /// When the run finished (UTC, RFC 3339).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub date: String,
    /// Every measurement, for machines.
    pub records: Vec<serde_json::Value>,
    pub seconds: f64,
}

impl Report {
    /// The Markdown page: setup, verdicts, tables.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "## normvision experiment {}{}\n\n`{}` ({:.0} s)\n\n{}\n\n",
            self.name,
            if self.quick { " (quick)" } else { "" },
            self.command,
            self.seconds,
            self.setup
        );
        let mut v = Table::new("Claims", &["claim", "paper", "ours", "verdict", "why"]);
        for d in &self.verdicts {
            v.row(vec![
                d.claim.clone(),
                d.paper.clone(),
                d.ours.clone(),
                d.status().as_str().into(),
                d.why.clone(),
            ]);
        }
        s += &v.markdown();
        for t in &self.tables {
            s += "\n";
            s += &t.markdown();
        }
        s
    }

    /// The plots with their file stems: NAME, NAME-2, NAME-3, …
    pub fn plots(&self) -> Vec<(String, &Plot)> {
        self.plot
            .iter()
            .chain(&self.extra_plots)
            .enumerate()
            .map(|(i, p)| {
                let stem = if i == 0 {
                    self.name.clone()
                } else {
                    format!("{}-{}", self.name, i + 1)
                };
                (stem, p)
            })
            .collect()
    }

    /// Writes `NAME.md`, `NAME.json` and each plot as SVG and PNG into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(crate::error::io_at(dir, "create directory"))?;
        let md = dir.join(format!("{}.md", self.name));
        crate::io::write_atomic(&md, self.markdown().as_bytes())?;
        let js = dir.join(format!("{}.json", self.name));
        let text = serde_json::to_string_pretty(self).expect("a report serialises");
        crate::io::write_atomic(&js, text.as_bytes())?;
        for (stem, p) in self.plots() {
            plot_svg(p, &dir.join(format!("{stem}.svg")))?;
            plot_png(p, &dir.join(format!("{stem}.png")))?;
        }
        Ok(())
    }
}

/// Draws `p` as an SVG line plot.
pub fn plot_svg(p: &Plot, path: &Path) -> Result<()> {
    ensure_font(path)?;
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    draw(p, root, path)
}

/// Where the PNG plots' font is (Debian's fonts-dejavu-core, which `scripts/setup.sh` installs).
pub const PNG_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Registers [`PNG_FONT`] as plotters' "sans-serif" (once): both backends lay text out with it.
fn ensure_font(path: &Path) -> Result<()> {
    static FONT: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    let ok = FONT.get_or_init(|| {
        let bytes = std::fs::read(PNG_FONT).map_err(|e| {
            format!("plots need the font {PNG_FONT} (Debian's fonts-dejavu-core; scripts/setup.sh installs it): {e}")
        })?;
        let leaked: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, leaked)
            .map_err(|_| format!("{PNG_FONT}: not a usable font"))
    });
    if let Err(e) = ok {
        return Err(NvError::Config(format!("plot {}: {e}", path.display())));
    }
    Ok(())
}

/// Draws `p` as a PNG line plot, with the text in [`PNG_FONT`] (an error naming the font when it is missing).
pub fn plot_png(p: &Plot, path: &Path) -> Result<()> {
    ensure_font(path)?;
    let (w, h) = (800u32, 500u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    draw(
        p,
        BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area(),
        path,
    )?;
    // encoded by the crate's own `image` (plotters' encoder would pull in a second version of it)
    let img = image::RgbImage::from_raw(w, h, buf).expect("an 800x500 RGB buffer");
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png)
        .map_err(|e| NvError::Config(format!("plot {}: PNG encoding: {e}", path.display())))?;
    crate::io::write_atomic(path, png.get_ref())
}

fn draw<DB: DrawingBackend>(
    p: &Plot,
    root: DrawingArea<DB, plotters::coord::Shift>,
    path: &Path,
) -> Result<()> {
    let err = |e: String| NvError::Config(format!("plot {}: {e}", path.display()));
    let pts = p
        .series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return Ok(()); // nothing to draw
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let (x1, y0, y1) = (x1.max(x0 + 1e-9), y0 - pad, y1 + pad);
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut ch = ChartBuilder::on(&root)
        .caption(&p.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| err(e.to_string()))?;
    ch.configure_mesh()
        .x_desc(p.x.as_str())
        .y_desc(p.y.as_str())
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (i, s) in p.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let finite: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        ch.draw_series(LineSeries::new(
            finite.iter().copied(),
            color.stroke_width(2),
        ))
        .map_err(|e| err(e.to_string()))?
        .label(s.label.as_str())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        ch.draw_series(
            finite
                .iter()
                .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
        )
        .map_err(|e| err(e.to_string()))?;
    }
    ch.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerLeft)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}
