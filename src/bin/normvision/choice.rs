//! clap parsers for the library's choice enums (`--model`, `--norm`, `--conv`, `--isa`): each value listed
//! with its help in `--help`, parsed by name. (The library stays free of clap: these enums are its own.)

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};

/// A parser accepting the names of `items`, listed with their help.
pub fn parser<T: Clone + Send + Sync + 'static>(
    items: &'static [T],
    name: fn(&T) -> &'static str,
    help: fn(&T) -> &'static str,
) -> impl TypedValueParser<Value = T> {
    let values: Vec<PossibleValue> = items
        .iter()
        .map(|t| PossibleValue::new(name(t)).help(help(t)))
        .collect();
    PossibleValuesParser::new(values).map(move |s| {
        items
            .iter()
            .find(|t| name(t) == s)
            .expect("clap accepted one of the names")
            .clone()
    })
}

pub fn norm() -> impl TypedValueParser<Value = normvision::model::NormKind> {
    use normvision::model::NormKind;
    parser(&NormKind::ALL, |k| k.as_str(), |k| k.help())
}

/// `--backbone-norm`: a norm, or `sync` (BatchNorm whose statistics span the ranks).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BackboneNorm {
    Norm(normvision::model::NormKind),
    Sync,
}

pub fn backbone_norm() -> impl TypedValueParser<Value = BackboneNorm> {
    use normvision::model::NormKind;
    let mut values: Vec<PossibleValue> = NormKind::ALL
        .iter()
        .map(|k| PossibleValue::new(k.as_str()).help(k.help()))
        .collect();
    values.push(PossibleValue::new("sync").help(
        "--task detect: BatchNorm with SyncBN, its statistics over every rank's images (`mpirun -np N \
         normvision train --task detect --distributed --backbone-norm sync`)",
    ));
    PossibleValuesParser::new(values).map(|s| {
        NormKind::ALL
            .iter()
            .find(|k| k.as_str() == s)
            .map_or(BackboneNorm::Sync, |k| BackboneNorm::Norm(*k))
    })
}

pub fn model() -> impl TypedValueParser<Value = normvision::model::ModelKind> {
    use normvision::model::ModelKind;
    parser(&ModelKind::ALL, |k| k.as_str(), |k| k.help())
}

pub fn conv() -> impl TypedValueParser<Value = normvision::nn::ConvChoice> {
    use normvision::nn::ConvChoice;
    parser(&ConvChoice::ALL, |c| c.name(), |c| c.help())
}

static ISAS: [normvision::Isa; 3] = [
    normvision::Isa::Avx512,
    normvision::Isa::Avx2,
    normvision::Isa::Portable,
];

pub fn isa() -> impl TypedValueParser<Value = normvision::Isa> {
    use normvision::Isa;
    parser(
        &ISAS,
        |i| i.as_str(),
        |i| match i {
            Isa::Avx512 => "AVX-512F kernels where they exist (the default on CPUs that have it)",
            Isa::Avx2 => "AVX2/FMA kernels; no AVX-512",
            Isa::Portable => "no explicit SIMD intrinsics",
        },
    )
}
