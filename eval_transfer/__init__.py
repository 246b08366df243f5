"""Transfer evaluation (t-ReX protocol): feature extraction and logistic-regression classifiers.

``main_ft_extract.py`` writes ``features_{trainval,test}.pth``, ``main_clf.py`` trains the classifier on them;
:mod:`eval_transfer.datasets` reads the on-disk layouts of the t-ReX suite.
"""
