//! Drawing detections: each box as a 2-pixel outline in its class's Pascal VOC colour, with a tag above it
//! (inside the image) holding the class name and the score in a 5×7 bitmap font (upper case, digits and a
//! few signs; other characters draw as blanks).

use super::detector::Detection;

/// 5×7 glyphs, one byte per row (low 5 bits, most significant bit leftmost).
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        'A' => [14, 17, 17, 31, 17, 17, 17],
        'B' => [30, 17, 17, 30, 17, 17, 30],
        'C' => [14, 17, 16, 16, 16, 17, 14],
        'D' => [30, 17, 17, 17, 17, 17, 30],
        'E' => [31, 16, 16, 30, 16, 16, 31],
        'F' => [31, 16, 16, 30, 16, 16, 16],
        'G' => [14, 17, 16, 23, 17, 17, 15],
        'H' => [17, 17, 17, 31, 17, 17, 17],
        'I' => [14, 4, 4, 4, 4, 4, 14],
        'J' => [7, 2, 2, 2, 2, 18, 12],
        'K' => [17, 18, 20, 24, 20, 18, 17],
        'L' => [16, 16, 16, 16, 16, 16, 31],
        'M' => [17, 27, 21, 21, 17, 17, 17],
        'N' => [17, 17, 25, 21, 19, 17, 17],
        'O' => [14, 17, 17, 17, 17, 17, 14],
        'P' => [30, 17, 17, 30, 16, 16, 16],
        'Q' => [14, 17, 17, 17, 21, 18, 13],
        'R' => [30, 17, 17, 30, 20, 18, 17],
        'S' => [15, 16, 16, 14, 1, 1, 30],
        'T' => [31, 4, 4, 4, 4, 4, 4],
        'U' => [17, 17, 17, 17, 17, 17, 14],
        'V' => [17, 17, 17, 17, 17, 10, 4],
        'W' => [17, 17, 17, 21, 21, 21, 10],
        'X' => [17, 17, 10, 4, 10, 17, 17],
        'Y' => [17, 17, 10, 4, 4, 4, 4],
        'Z' => [31, 1, 2, 4, 8, 16, 31],
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        '/' => [0, 1, 2, 4, 8, 16, 0],
        _ => [0; 7],
    }
}

/// An RGB image being drawn on.
struct Canvas<'a> {
    rgb: &'a mut [u8],
    w: usize,
    h: usize,
}

impl Canvas<'_> {
    fn put(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let at = (y as usize * self.w + x as usize) * 3;
            self.rgb[at..at + 3].copy_from_slice(&c);
        }
    }

    fn text(&mut self, x: i64, y: i64, s: &str, fg: [u8; 3], bg: [u8; 3]) {
        let width = s.chars().count() as i64 * 6 + 1;
        for dy in 0..9 {
            for dx in 0..width {
                self.put(x + dx, y + dy, bg);
            }
        }
        for (k, ch) in s.chars().enumerate() {
            let g = glyph(ch);
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits >> (4 - col) & 1 == 1 {
                        self.put(x + 1 + k as i64 * 6 + col, y + 1 + row as i64, fg);
                    }
                }
            }
        }
    }
}

/// Draws `dets` on an RGB image (`w`×`h`, interleaved) in place; `names[label − 1]` names each class and
/// `palette` (768 bytes, Pascal VOC's) colours it.
pub fn draw_detections(
    rgb: &mut [u8],
    w: usize,
    h: usize,
    dets: &[Detection],
    names: &[String],
    palette: &[u8],
) {
    let mut cv = Canvas { rgb, w, h };
    // the lowest scores first, so the best end on top
    let mut order: Vec<&Detection> = dets.iter().collect();
    order.sort_by(|a, b| a.score.total_cmp(&b.score));
    for d in order {
        let k = d.label % 256;
        let col = [palette[3 * k], palette[3 * k + 1], palette[3 * k + 2]];
        let [x1, y1, x2, y2] = d.bbox.map(|v| v.round() as i64);
        for t in 0..2 {
            for x in x1..=x2 {
                cv.put(x, y1 + t, col);
                cv.put(x, y2 - t, col);
            }
            for y in y1..=y2 {
                cv.put(x1 + t, y, col);
                cv.put(x2 - t, y, col);
            }
        }
        let name = names
            .get(d.label.wrapping_sub(1))
            .map_or("?", String::as_str);
        let tag = format!("{name} {:.2}", d.score);
        let ty = if y1 >= 9 { y1 - 9 } else { y1 + 2 };
        let luma = col[0] as u32 * 3 + col[1] as u32 * 6 + col[2] as u32;
        let fg = if luma > 1280 {
            [0, 0, 0]
        } else {
            [255, 255, 255]
        };
        cv.text(x1, ty, &tag, fg, col);
    }
}
