//! A small LaTeX-subset expression parser and a float evaluator, both bounded.
//!
//! The parser accepts what final answers are written in: numbers, variables, `+ - * / ^`,
//! implicit products (`2x`, `2\sqrt{3}`, `(x+1)(x-1)`), `\frac`, `\sqrt[n]{}`, `\binom`,
//! `\pi`, `e`, functions (`\sin`, `\ln`, `\log_b`, ...), `|x|`, `n!` and `%`. Input length,
//! nesting depth and node count are capped; anything beyond is a parse failure (`None`),
//! never a panic or a long computation.

use super::number::Num;

/// Longest input the parser looks at.
pub(crate) const MAX_INPUT: usize = 2048;
/// Deepest nesting of groups and operators.
const MAX_DEPTH: usize = 48;
/// Most nodes in one tree.
const MAX_NODES: usize = 512;

/// A function of one argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Func {
    Sin,
    Cos,
    Tan,
    Sec,
    Csc,
    Cot,
    Asin,
    Acos,
    Atan,
    Ln,
    Exp,
}

/// An expression tree.
#[derive(Debug, Clone)]
pub(crate) enum Expr {
    Num(Num),
    Pi,
    E,
    Inf,
    /// A variable, by index into the names shared by both sides of a comparison.
    Var(usize),
    Add(Vec<Expr>),
    Mul(Vec<Expr>),
    Neg(Box<Expr>),
    Div(Box<Expr>, Box<Expr>),
    Pow(Box<Expr>, Box<Expr>),
    /// `index`-th root (2 for `\sqrt`).
    Root(Box<Expr>, Box<Expr>),
    Func(Func, Box<Expr>),
    /// `log_base(arg)`.
    Log(Box<Expr>, Box<Expr>),
    Fact(Box<Expr>),
    Binom(Box<Expr>, Box<Expr>),
    Abs(Box<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(String),
    Ident(String),
    Cmd(String),
    Sym(char),
}

fn tokenize(s: &str) -> Option<Vec<Tok>> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            let start = i;
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                i += 1;
            }
            out.push(Tok::Num(s[start..i].to_string()));
        } else if c.is_ascii_alphabetic() {
            let start = i;
            while i < b.len() && b[i].is_ascii_alphabetic() {
                i += 1;
            }
            let word = &s[start..i];
            if NAMES.contains(&word) {
                out.push(Tok::Ident(word.to_string()));
            } else if word.len() <= 2 {
                // `xy`, `ab`: single-letter variables multiplied; a longer unknown word is
                // prose, not an expression.
                out.extend(word.chars().map(|c| Tok::Ident(c.to_string())));
            } else {
                return None;
            }
        } else if c == b'\\' {
            let start = i + 1;
            i += 1;
            while i < b.len() && b[i].is_ascii_alphabetic() {
                i += 1;
            }
            if i == start {
                // `\{`, `\}`, `\\`, `\,` ...: one escaped character.
                let ch = *b.get(i)?;
                i += 1;
                match ch {
                    b'{' => out.push(Tok::Sym('⟨')),
                    b'}' => out.push(Tok::Sym('⟩')),
                    b'\\' => out.push(Tok::Sym('↵')),
                    b',' | b';' | b'!' | b':' | b' ' => {}
                    _ => return None,
                }
            } else {
                out.push(Tok::Cmd(s[start..i].to_string()));
            }
        } else if c.is_ascii() {
            if !b"+-*/^()[]{},=<>!&|_%'".contains(&c) {
                return None;
            }
            out.push(Tok::Sym(c as char));
            i += 1;
        } else {
            let ch = s[i..].chars().next()?;
            let mapped = match ch {
                'π' => Tok::Cmd("pi".into()),
                '√' => Tok::Cmd("sqrt".into()),
                '·' | '×' => Tok::Sym('*'),
                '÷' => Tok::Sym('/'),
                '≤' => Tok::Cmd("le".into()),
                '≥' => Tok::Cmd("ge".into()),
                '≠' => Tok::Cmd("ne".into()),
                '±' => Tok::Cmd("pm".into()),
                _ => return None,
            };
            out.push(mapped);
            i += ch.len_utf8();
        }
    }
    Some(out)
}

/// Letter runs read as one name.
const NAMES: &[&str] = &[
    "pi", "inf", "infty", "infinity", "sqrt", "log", "ln", "exp", "sin", "cos", "tan", "sec",
    "csc", "cot", "arcsin", "arccos", "arctan",
];

/// Parses a cleaned expression; `names` interns variable names across both sides.
pub(crate) fn parse_expr(s: &str, names: &mut Vec<String>) -> Option<Expr> {
    if s.len() > MAX_INPUT {
        return None;
    }
    let toks = tokenize(s)?;
    let mut p = Parser {
        toks,
        pos: 0,
        depth: 0,
        nodes: 0,
        names,
    };
    let e = p.expr()?;
    (p.pos == p.toks.len()).then_some(e)
}

struct Parser<'n> {
    toks: Vec<Tok>,
    pos: usize,
    depth: usize,
    nodes: usize,
    names: &'n mut Vec<String>,
}

const FUNCS: &[(&str, Func)] = &[
    ("sin", Func::Sin),
    ("cos", Func::Cos),
    ("tan", Func::Tan),
    ("sec", Func::Sec),
    ("csc", Func::Csc),
    ("cot", Func::Cot),
    ("arcsin", Func::Asin),
    ("arccos", Func::Acos),
    ("arctan", Func::Atan),
    ("ln", Func::Ln),
    ("exp", Func::Exp),
];

const GREEK: &[&str] = &[
    "alpha",
    "beta",
    "gamma",
    "delta",
    "theta",
    "lambda",
    "mu",
    "phi",
    "omega",
    "sigma",
    "tau",
    "rho",
    "varphi",
    "epsilon",
    "varepsilon",
];

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(&Tok::Sym(c)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn node(&mut self, e: Expr) -> Option<Expr> {
        self.nodes += 1;
        (self.nodes <= MAX_NODES).then_some(e)
    }

    fn enter(&mut self) -> Option<()> {
        self.depth += 1;
        (self.depth <= MAX_DEPTH).then_some(())
    }

    fn var(&mut self, name: &str) -> Option<Expr> {
        let i = match self.names.iter().position(|n| n == name) {
            Some(i) => i,
            None => {
                if self.names.len() >= 16 {
                    return None;
                }
                self.names.push(name.to_string());
                self.names.len() - 1
            }
        };
        self.node(Expr::Var(i))
    }

    /// Sum: terms joined by `+` and `-`.
    fn expr(&mut self) -> Option<Expr> {
        self.enter()?;
        let mut terms = vec![self.term()?];
        loop {
            if self.eat('+') {
                terms.push(self.term()?);
            } else if self.eat('-') {
                let t = self.term()?;
                terms.push(self.node(Expr::Neg(Box::new(t)))?);
            } else {
                break;
            }
        }
        self.depth -= 1;
        Some(if terms.len() == 1 {
            terms.pop()?
        } else {
            self.node(Expr::Add(terms))?
        })
    }

    /// Product: factors joined by `*`, `\cdot`, `\times`, `/`, `\div` or juxtaposition.
    fn term(&mut self) -> Option<Expr> {
        self.enter()?;
        let mut acc = self.unary()?;
        loop {
            let explicit_mul = match self.peek() {
                Some(Tok::Sym('*')) => true,
                Some(Tok::Cmd(c)) => c == "cdot" || c == "times",
                _ => false,
            };
            let div = match self.peek() {
                Some(Tok::Sym('/')) => true,
                Some(Tok::Cmd(c)) => c == "div",
                _ => false,
            };
            if explicit_mul || div {
                self.pos += 1;
                let rhs = self.unary()?;
                acc = if div {
                    self.node(Expr::Div(Box::new(acc), Box::new(rhs)))?
                } else {
                    self.node(Expr::Mul(vec![acc, rhs]))?
                };
            } else if self.starts_factor() {
                // `2 3` is not a product (nor `118 000` a number): juxtaposed literals fail.
                let prev_num = matches!(self.toks.get(self.pos.wrapping_sub(1)), Some(Tok::Num(_)));
                if prev_num && matches!(self.peek(), Some(Tok::Num(_))) {
                    return None;
                }
                let rhs = self.power()?;
                acc = self.node(Expr::Mul(vec![acc, rhs]))?;
            } else {
                break;
            }
        }
        self.depth -= 1;
        Some(acc)
    }

    /// True when the next token can begin an implicit factor.
    fn starts_factor(&self) -> bool {
        match self.peek() {
            Some(Tok::Num(_) | Tok::Ident(_)) => true,
            Some(Tok::Sym(c)) => matches!(c, '(' | '{'),
            Some(Tok::Cmd(c)) => !matches!(
                c.as_str(),
                "cdot"
                    | "times"
                    | "div"
                    | "le"
                    | "leq"
                    | "ge"
                    | "geq"
                    | "lt"
                    | "gt"
                    | "ne"
                    | "neq"
                    | "pm"
                    | "mp"
                    | "cup"
                    | "cap"
                    | "end"
                    | "approx"
                    | "to"
                    | "in"
            ),
            None => false,
        }
    }

    fn unary(&mut self) -> Option<Expr> {
        self.enter()?;
        let e = if self.eat('-') {
            let inner = self.unary()?;
            self.node(Expr::Neg(Box::new(inner)))?
        } else if self.eat('+') {
            self.unary()?
        } else {
            self.power()?
        };
        self.depth -= 1;
        Some(e)
    }

    /// A postfix expression with an optional (right-associative) exponent.
    fn power(&mut self) -> Option<Expr> {
        self.enter()?;
        let base = self.postfix()?;
        let e = if self.eat('^') {
            let exp = self.exponent()?;
            let e = self.node(Expr::Pow(Box::new(base), Box::new(exp)))?;
            self.postfix_ops(e)?
        } else {
            base
        };
        self.depth -= 1;
        Some(e)
    }

    fn exponent(&mut self) -> Option<Expr> {
        self.enter()?;
        let e = if self.eat('-') {
            let inner = self.exponent()?;
            self.node(Expr::Neg(Box::new(inner)))?
        } else {
            let b = self.primary()?;
            if self.eat('^') {
                let x = self.exponent()?;
                self.node(Expr::Pow(Box::new(b), Box::new(x)))?
            } else {
                b
            }
        };
        self.depth -= 1;
        Some(e)
    }

    fn postfix(&mut self) -> Option<Expr> {
        let p = self.primary()?;
        self.postfix_ops(p)
    }

    fn postfix_ops(&mut self, mut e: Expr) -> Option<Expr> {
        loop {
            if self.eat('!') {
                e = self.node(Expr::Fact(Box::new(e)))?;
            } else if self.eat('%') {
                let hundred = Expr::Num(Num::int(100));
                e = self.node(Expr::Div(Box::new(e), Box::new(hundred)))?;
            } else {
                return Some(e);
            }
        }
    }

    /// A `{...}` group or a single token (LaTeX argument).
    fn arg(&mut self) -> Option<Expr> {
        if self.eat('{') {
            let e = self.expr()?;
            return self.eat('}').then_some(e);
        }
        match self.peek()?.clone() {
            Tok::Num(n) => {
                // `\frac12`: one digit is one argument.
                let first = n.chars().next()?;
                if n.len() > 1 && first != '.' {
                    self.toks[self.pos] = Tok::Num(n[1..].to_string());
                    self.node(Expr::Num(Num::parse_decimal(&n[..1])?))
                } else {
                    self.primary()
                }
            }
            Tok::Ident(id) if id.len() > 1 && !NAMES.contains(&id.as_str()) => {
                self.toks[self.pos] = Tok::Ident(id[1..].to_string());
                self.var(&id[..1])
            }
            _ => self.primary(),
        }
    }

    fn primary(&mut self) -> Option<Expr> {
        self.enter()?;
        let tok = self.peek()?.clone();
        self.pos += 1;
        let e = match tok {
            Tok::Num(n) => self.node(Expr::Num(Num::parse_decimal(&n)?))?,
            Tok::Sym('(') => {
                let e = self.expr()?;
                self.eat(')').then_some(e)?
            }
            Tok::Sym('[') => {
                let e = self.expr()?;
                self.eat(']').then_some(e)?
            }
            Tok::Sym('{') => {
                let e = self.expr()?;
                self.eat('}').then_some(e)?
            }
            Tok::Sym('|') => {
                let e = self.expr()?;
                self.eat('|').then_some(())?;
                self.node(Expr::Abs(Box::new(e)))?
            }
            Tok::Ident(id) => self.ident(&id)?,
            Tok::Cmd(c) => self.command(&c)?,
            Tok::Sym(_) => return None,
        };
        self.depth -= 1;
        Some(e)
    }

    /// A run of letters: a known name (`pi`, `sqrt`, `sin`, `inf`) or single-letter variables
    /// multiplied (`xy`). Longer unknown words are not expressions.
    fn ident(&mut self, id: &str) -> Option<Expr> {
        match id {
            "pi" => return self.node(Expr::Pi),
            "inf" | "infty" | "infinity" => return self.node(Expr::Inf),
            "e" => return self.node(Expr::E),
            "sqrt" => return self.command("sqrt"),
            "log" => return self.command("log"),
            _ => {}
        }
        if let Some(&(_, f)) = FUNCS.iter().find(|(n, _)| *n == id) {
            return self.func(f);
        }
        if id.len() > 2 {
            return None;
        }
        let mut factors = Vec::new();
        for (k, ch) in id.char_indices() {
            let mut name = ch.to_string();
            // A subscript on the last letter: `x_1`, `a_{10}`.
            if k + 1 == id.len() && self.eat('_') {
                match self.peek()?.clone() {
                    Tok::Num(n) | Tok::Ident(n) => {
                        self.pos += 1;
                        name = format!("{name}_{n}");
                    }
                    Tok::Sym('{') => {
                        self.pos += 1;
                        let (Tok::Num(n) | Tok::Ident(n)) = self.peek()?.clone() else {
                            return None;
                        };
                        self.pos += 1;
                        self.eat('}').then_some(())?;
                        name = format!("{name}_{n}");
                    }
                    _ => return None,
                }
            }
            factors.push(if ch == 'e' && id.len() == 1 {
                self.node(Expr::E)?
            } else {
                self.var(&name)?
            });
        }
        match factors.len() {
            1 => factors.pop(),
            _ => self.node(Expr::Mul(factors)),
        }
    }

    fn func(&mut self, f: Func) -> Option<Expr> {
        // `\sin^2 x` is `(\sin x)^2`.
        let power = if self.eat('^') {
            Some(self.exponent()?)
        } else {
            None
        };
        let arg = self.func_arg()?;
        let mut e = self.node(Expr::Func(f, Box::new(arg)))?;
        if let Some(p) = power {
            e = self.node(Expr::Pow(Box::new(e), Box::new(p)))?;
        }
        Some(e)
    }

    /// A function argument: a parenthesised expression, or the implicit product that follows.
    fn func_arg(&mut self) -> Option<Expr> {
        if matches!(self.peek(), Some(Tok::Sym('('))) {
            return self.power();
        }
        let mut acc = self.power()?;
        while matches!(self.peek(), Some(Tok::Num(_) | Tok::Ident(_))) {
            let rhs = self.power()?;
            acc = self.node(Expr::Mul(vec![acc, rhs]))?;
        }
        Some(acc)
    }

    fn command(&mut self, c: &str) -> Option<Expr> {
        match c {
            "frac" | "dfrac" | "tfrac" | "cfrac" => {
                let a = self.arg()?;
                let b = self.arg()?;
                self.node(Expr::Div(Box::new(a), Box::new(b)))
            }
            "binom" | "dbinom" | "tbinom" | "choose" => {
                let a = self.arg()?;
                let b = self.arg()?;
                self.node(Expr::Binom(Box::new(a), Box::new(b)))
            }
            "sqrt" => {
                let index = if self.eat('[') {
                    let e = self.expr()?;
                    self.eat(']').then_some(e)?
                } else {
                    Expr::Num(Num::int(2))
                };
                let a = self.arg()?;
                self.node(Expr::Root(Box::new(index), Box::new(a)))
            }
            "pi" => self.node(Expr::Pi),
            "infty" | "inf" => self.node(Expr::Inf),
            "log" | "lg" => {
                let base = if self.eat('_') {
                    self.arg()?
                } else {
                    Expr::Num(Num::int(10))
                };
                let arg = self.func_arg()?;
                self.node(Expr::Log(Box::new(base), Box::new(arg)))
            }
            "exp" => {
                let arg = self.func_arg()?;
                self.node(Expr::Func(Func::Exp, Box::new(arg)))
            }
            "mathrm" | "mathbf" | "text" | "operatorname" => self.arg(),
            _ => {
                if let Some(&(_, f)) = FUNCS.iter().find(|(n, _)| *n == c) {
                    return self.func(f);
                }
                if GREEK.contains(&c) {
                    return self.var(c);
                }
                None
            }
        }
    }
}

/// Largest factorial / binomial argument evaluated.
const MAX_FACT: f64 = 170.0;

/// Evaluates `e` with `vars` as the values of the variables. Overflow gives `inf`, a domain
/// error `NaN`; neither panics.
pub(crate) fn eval(e: &Expr, vars: &[f64]) -> f64 {
    match e {
        Expr::Num(n) => n.to_f64(),
        Expr::Pi => std::f64::consts::PI,
        Expr::E => std::f64::consts::E,
        Expr::Inf => f64::INFINITY,
        Expr::Var(i) => vars.get(*i).copied().unwrap_or(f64::NAN),
        Expr::Add(ts) => ts.iter().map(|t| eval(t, vars)).sum(),
        Expr::Mul(fs) => fs.iter().map(|f| eval(f, vars)).product(),
        Expr::Neg(a) => -eval(a, vars),
        Expr::Div(a, b) => eval(a, vars) / eval(b, vars),
        Expr::Pow(a, b) => {
            let (x, y) = (eval(a, vars), eval(b, vars));
            if x < 0.0 && y.fract() != 0.0 {
                // Odd roots of negatives written as powers: (-8)^(1/3) = -2.
                let inv = 1.0 / y;
                if (inv - inv.round()).abs() < 1e-9 && inv.round() % 2.0 != 0.0 {
                    return -(-x).powf(y);
                }
            }
            x.powf(y)
        }
        Expr::Root(n, a) => {
            let (n, x) = (eval(n, vars), eval(a, vars));
            if n == 2.0 {
                x.sqrt()
            } else if n == 3.0 {
                x.cbrt()
            } else if x < 0.0 && n.fract() == 0.0 && n % 2.0 != 0.0 {
                -(-x).powf(1.0 / n)
            } else {
                x.powf(1.0 / n)
            }
        }
        Expr::Func(f, a) => {
            let x = eval(a, vars);
            match f {
                Func::Sin => x.sin(),
                Func::Cos => x.cos(),
                Func::Tan => x.tan(),
                Func::Sec => 1.0 / x.cos(),
                Func::Csc => 1.0 / x.sin(),
                Func::Cot => 1.0 / x.tan(),
                Func::Asin => x.asin(),
                Func::Acos => x.acos(),
                Func::Atan => x.atan(),
                Func::Ln => x.ln(),
                Func::Exp => x.exp(),
            }
        }
        Expr::Log(b, a) => eval(a, vars).ln() / eval(b, vars).ln(),
        Expr::Fact(a) => {
            let n = eval(a, vars);
            if n < 0.0 || n.fract() != 0.0 {
                f64::NAN
            } else if n > MAX_FACT {
                f64::INFINITY
            } else {
                (1..=n as u32).map(f64::from).product()
            }
        }
        Expr::Binom(n, k) => {
            let (n, k) = (eval(n, vars), eval(k, vars));
            if n.fract() != 0.0 || k.fract() != 0.0 || k < 0.0 || n < 0.0 {
                return f64::NAN;
            }
            if k > n {
                return 0.0;
            }
            let k = k.min(n - k);
            if k > MAX_FACT * 6.0 {
                return f64::INFINITY;
            }
            (0..k as u32)
                .map(|i| (n - f64::from(i)) / f64::from(i + 1))
                .product()
        }
        Expr::Abs(a) => eval(a, vars).abs(),
    }
}

/// True when the tree has no variables.
pub(crate) fn is_constant(e: &Expr) -> bool {
    match e {
        Expr::Var(_) => false,
        Expr::Num(_) | Expr::Pi | Expr::E | Expr::Inf => true,
        Expr::Add(v) | Expr::Mul(v) => v.iter().all(is_constant),
        Expr::Neg(a) | Expr::Func(_, a) | Expr::Fact(a) | Expr::Abs(a) => is_constant(a),
        Expr::Div(a, b)
        | Expr::Pow(a, b)
        | Expr::Root(a, b)
        | Expr::Log(a, b)
        | Expr::Binom(a, b) => is_constant(a) && is_constant(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn val(s: &str) -> f64 {
        let mut names = Vec::new();
        let e = parse_expr(s, &mut names).unwrap_or_else(|| panic!("parse {s}"));
        eval(&e, &[2.0, 3.0])
    }

    #[test]
    fn parses_and_evaluates_latex() {
        assert_eq!(val("1+2*3"), 7.0);
        assert_eq!(val("\\frac{1}{2}"), 0.5);
        assert_eq!(val("\\frac12"), 0.5);
        assert_eq!(val("2\\sqrt{9}"), 6.0);
        assert_eq!(val("\\sqrt9"), 3.0);
        assert_eq!(val("\\sqrt[3]{8}"), 2.0);
        assert_eq!(val("x^2-5x+6"), 0.0);
        assert_eq!(val("xy"), 6.0);
        assert_eq!(val("2^{-1}"), 0.5);
        assert_eq!(val("\\binom{5}{2}"), 10.0);
        assert_eq!(val("5!"), 120.0);
        assert_eq!(val("(x+1)(x-1)"), 3.0);
        assert_eq!(val("|-3|"), 3.0);
        assert_eq!(val("\\log_2 8"), 3.0);
        assert!((val("\\sin^2 x + \\cos^2 x") - 1.0).abs() < 1e-12);
        assert!((val("pi/4") - std::f64::consts::FRAC_PI_4).abs() < 1e-15);
        assert_eq!(val("10^{10^{10}}"), f64::INFINITY);
    }

    #[test]
    fn refuses_what_it_cannot_bound() {
        let mut n = Vec::new();
        assert!(parse_expr(&"(".repeat(100), &mut n).is_none());
        assert!(parse_expr(&format!("{}1{}", "{".repeat(60), "}".repeat(60)), &mut n).is_none());
        assert!(parse_expr("hello", &mut n).is_none());
        assert!(parse_expr("1 +", &mut n).is_none());
        assert!(parse_expr(&"1+".repeat(600), &mut n).is_none());
    }
}
