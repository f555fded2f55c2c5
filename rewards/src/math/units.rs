//! Units after a number: a right number in another unit is refused (`12 feet` vs
//! `12 inches`), and a compound quantity (`2 hours and 30 minutes`) is converted to the
//! unit it starts with.

use super::number::Num;

/// A unit: canonical name, dimension, size in the dimension's base unit as `num/den`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unit {
    pub name: &'static str,
    dim: &'static str,
    num: i128,
    den: i128,
}

const fn u(name: &'static str, dim: &'static str, num: i128, den: i128) -> Unit {
    Unit {
        name,
        dim,
        num,
        den,
    }
}

/// (spellings, unit). Ambiguous short words (`in`, `l`, `a`) are left out.
const UNITS: &[(&[&str], Unit)] = &[
    (&["inch", "inches"], u("inch", "length", 1, 1)),
    (&["foot", "feet", "ft"], u("foot", "length", 12, 1)),
    (&["yard", "yards", "yd", "yds"], u("yard", "length", 36, 1)),
    (&["mile", "miles", "mi"], u("mile", "length", 63_360, 1)),
    (
        &[
            "mm",
            "millimeter",
            "millimeters",
            "millimetre",
            "millimetres",
        ],
        u("mm", "length", 5, 127),
    ),
    (
        &[
            "cm",
            "centimeter",
            "centimeters",
            "centimetre",
            "centimetres",
        ],
        u("cm", "length", 50, 127),
    ),
    (
        &["m", "meter", "meters", "metre", "metres"],
        u("m", "length", 5_000, 127),
    ),
    (
        &["km", "kilometer", "kilometers", "kilometre", "kilometres"],
        u("km", "length", 5_000_000, 127),
    ),
    (
        &["second", "seconds", "sec", "secs", "s"],
        u("second", "time", 1, 1),
    ),
    (
        &["minute", "minutes", "min", "mins"],
        u("minute", "time", 60, 1),
    ),
    (
        &["hour", "hours", "hr", "hrs", "h"],
        u("hour", "time", 3_600, 1),
    ),
    (&["day", "days"], u("day", "time", 86_400, 1)),
    (&["week", "weeks"], u("week", "time", 604_800, 1)),
    (&["month", "months"], u("month", "month", 1, 1)),
    (&["year", "years"], u("year", "month", 12, 1)),
    (&["gram", "grams", "g"], u("gram", "mass", 1, 1)),
    (&["kg", "kilogram", "kilograms"], u("kg", "mass", 1_000, 1)),
    (
        &["pound", "pounds", "lb", "lbs"],
        u("pound", "weight", 16, 1),
    ),
    (&["ounce", "ounces", "oz"], u("ounce", "weight", 1, 1)),
    (&["ton", "tons"], u("ton", "weight", 32_000, 1)),
    (&["dollar", "dollars"], u("dollar", "money", 100, 1)),
    (&["cent", "cents"], u("cent", "money", 1, 1)),
    (
        &[
            "ml",
            "milliliter",
            "milliliters",
            "millilitre",
            "millilitres",
        ],
        u("ml", "volume", 1, 1),
    ),
    (
        &["liter", "liters", "litre", "litres"],
        u("liter", "volume", 1_000, 1),
    ),
    (&["gallon", "gallons"], u("gallon", "us_volume", 128, 1)),
    (&["quart", "quarts"], u("quart", "us_volume", 32, 1)),
    (&["pint", "pints"], u("pint", "us_volume", 16, 1)),
    (&["cup", "cups"], u("cup", "us_volume", 8, 1)),
];

fn lookup(word: &str) -> Option<Unit> {
    let w = word.trim_end_matches('.').to_ascii_lowercase();
    UNITS
        .iter()
        .find(|(names, _)| names.contains(&w.as_str()))
        .map(|(_, u)| *u)
}

/// The unit word right after the leading number of a cleaned answer (`12 feet tall` → foot).
pub(crate) fn leading_unit(s: &str) -> Option<Unit> {
    let mut words = s.split_whitespace();
    let first = words.next()?;
    let digits = first.trim_start_matches(['-', '+']);
    if !digits.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
        return None;
    }
    // `12ft`: the unit glued to the number.
    let glued = digits.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.' || c == ',');
    if !glued.is_empty() {
        return lookup(glued);
    }
    lookup(words.next()?)
}

/// A compound quantity: at least two `number unit` pairs of one dimension (`2 hours and 30
/// minutes`), as a value in its first unit, with that unit.
pub(crate) fn compound(s: &str) -> Option<(Num, Unit)> {
    let words: Vec<&str> = s
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty() && !w.eq_ignore_ascii_case("and"))
        .collect();
    if words.len() < 4 || words.len() % 2 != 0 || words.len() > 8 {
        return None;
    }
    let mut total = Num::int(0);
    let mut first: Option<Unit> = None;
    for pair in words.chunks(2) {
        let n = Num::parse_decimal(pair[0])?;
        let unit = lookup(pair[1])?;
        let head = *first.get_or_insert(unit);
        if unit.dim != head.dim {
            return None;
        }
        // Convert to the first unit: n · unit / head.
        let factor = Num::ratio(
            unit.num.checked_mul(head.den)?,
            unit.den.checked_mul(head.num)?,
        )?;
        total = total.add(n.mul(factor));
    }
    Some((total, first?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_recognised() {
        assert_eq!(leading_unit("12 feet").map(|u| u.name), Some("foot"));
        assert_eq!(leading_unit("12 inches tall").map(|u| u.name), Some("inch"));
        assert_eq!(leading_unit("12ft").map(|u| u.name), Some("foot"));
        assert_eq!(leading_unit("12 apples"), None);
        let (v, unit) = compound("2 hours and 30 minutes").expect("compound");
        assert_eq!((v.to_f64(), unit.name), (2.5, "hour"));
        assert!(compound("2 hours and 30 grams").is_none());
        assert!(compound("2 hours").is_none());
    }
}
