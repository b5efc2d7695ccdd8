"""The paper's Table 2 (ResNet-50 FEs; test SA / PGD-10 / AA in percent), as the project's docs/method.md gives it
(section "Reference numbers (paper, Table 2, ResNet-50; SA / PGD-10 / AA, percent)"), which comparison.md
sets beside ours for the paper's data sets."""

# Keyed by config.dataset.name and method name.
PAPER_TABLE2 = {
    'cifar10': {'vanilla_rft': (86.33, 56.51, 51.67), 'twins': (86.50, 56.77, 51.73),
                'autolora': (86.93, 57.16, 52.00)},
    'cifar100': {'vanilla_rft': (63.25, 33.25, 28.26), 'twins': (65.52, 33.79, 28.37),
                 'autolora': (66.20, 35.25, 29.50)},
    'dtd': {'vanilla_rft': (52.99, 27.36, 23.35), 'twins': (54.22, 28.94, 23.88),
            'autolora': (53.35, 30.21, 25.59)},
    'stanford_dogs': {'vanilla_rft': (62.68, 24.87, 12.73), 'twins': (63.64, 24.98, 14.41),
                      'autolora': (62.33, 25.32, 17.44)},
    'caltech_birds2011': {'vanilla_rft': (57.27, 28.37, 23.09), 'twins': (63.58, 29.60, 23.71),
                          'autolora': (62.78, 31.07, 24.40)},
    'caltech256': {'vanilla_rft': (66.78, 47.76, 42.17), 'twins': (69.41, 47.79, 42.27),
                   'autolora': (69.85, 47.82, 42.63)},
}
PAPER_DATASET_NAMES = {'cifar10': 'CIFAR-10', 'cifar100': 'CIFAR-100', 'dtd': 'DTD',
                       'stanford_dogs': 'Stanford Dogs', 'caltech_birds2011': 'CUB-200',
                       'caltech256': 'Caltech-256'}
PAPER_METHODS = ('vanilla_rft', 'twins', 'autolora')  # the table's rows, in its order
