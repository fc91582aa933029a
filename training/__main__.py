"""`python -m training {train,cv,ensemble,compare,evaluate,export,synthetic}`: the offline side of the project."""

import argparse

from training import compare, cv, ensemble, evaluate, export, synthetic, train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module, help_text in [
        ("train", train, "train the classifier or the segmenter"),
        ("cv", cv, "patient-grouped K-fold cross-validation of the recipe, resumable; pooled report with intervals"),
        ("ensemble", ensemble, "the cross-validation of an ensemble of cv runs (mean outputs per fold), no training"),
        ("compare", compare, "recipes (cv folders) and shipped models side by side, as paired differences"),
        ("evaluate", evaluate, "choose thresholds on validation patients, measure on test patients, draw figures"),
        ("export", export, "export both networks to ONNX, check parity, write the model card"),
        ("synthetic", synthetic, "write a synthetic kaggle_3m-layout dataset (phantoms with exact masks)"),
    ]:
        sub = commands.add_parser(name, help=help_text)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
