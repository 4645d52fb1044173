"""Datasets: IDX, CIFAR pickles, digits and image folders, loaders and stratified subsets."""
