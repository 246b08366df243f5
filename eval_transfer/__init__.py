"""Transfer evaluation (t-ReX protocol) entry points: feature extraction and logistic-regression classifiers.

``main_ft_extract.py model.source=... data.dataset=... data.root=... run.output_dir=F`` writes
``F/features_{trainval,test}.pth``, ``main_clf.py clf.features_dir=F`` trains the classifier on them and
``print_results.py F1 F2 ...`` prints the table. The library behind them: :mod:`unic.data.transfer` (the
on-disk layouts, one registry entry each in :mod:`unic.data.registry`), :mod:`unic.eval.transfer` (features,
splits, classifiers) and :mod:`unic.eval.transfer_config` (the two entry points' settings).
"""
